// actsteer's ComfyUI frontend extension (served from web/, registered by WEB_DIRECTORY in the pack's __init__.py).
//
// 1. AcT Learn, Save and Load show their result line on the node ("saved styles/x (256 layers)", "learned ...
//    encode 1.2 s · sample 30.4 s · fit 0.3 s", "256 layers, linear-act, learned on SDXL"): the server sends it as
//    the node's `text` ui output.
// 2. Why an AcT node failed shows on the node itself: a queue-time check (the red outline alone says nothing) or an
//    error while it ran. ComfyUI puts a validate_inputs message on every input the check reads; it is kept on the
//    inputs the message names (node_errors.js), for the red rings and the error dialog alike.
// 3. After AcT Save writes a file, the server broadcasts the event "actsteer.transports" with the new file
//    list; every AcT Load Transport dropdown in every open tab follows it, without Refresh Node Definitions.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/actsteer.js
import { api } from "../../../scripts/api.js";
import { attributeErrors, errorText } from "./node_errors.js";

const PACK_PREFIX = "ActSteer";
const RESULT_NODES = new Set(["ActSteerLearn", "ActSteerSave", "ActSteerLoad"]);
const RESULT_WIDGET = "actsteer_result";
const FILES_EVENT = "actsteer.transports";
const LOAD_MIN_WIDTH = 380; // room for a file name such as "sdxl_watercolor_00001.safetensors"

function resultWidget(node, create = true) {
  const existing = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (existing || !create) return existing;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.rows = 2;
  box.placeholder = RESULT_NODES.has(node.comfyClass) ? "the result shows here after a run" : "";
  box.style.cssText = "width:100%;resize:none;font-size:11px;opacity:0.85;background:transparent;border:none;";
  const widget = node.addDOMWidget(RESULT_WIDGET, "actsteer_text", box, {
    serialize: false, // never sent to the server in the prompt (options.serialize; not a duplicate of the line below)
    getValue: () => box.value,
    setValue: (value) => { box.value = value ?? ""; },
  });
  widget.serialize = false; // never stored in the workflow's widgets_values
  widget.actsteerBox = box;
  return widget;
}

function grow(node) {
  const wanted = node.computeSize?.();
  if (wanted) node.setSize?.([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
}

// Show `text` on an AcT node: the result line, or (error = true) why it failed, in red.
function showOnNode(node, text, error = false) {
  if (!node) return;
  const hadWidget = !!resultWidget(node, false);
  const widget = resultWidget(node, true);
  widget.value = text;
  widget.actsteerBox.style.color = error ? "#ff6b6b" : "";
  node.actsteerShowsError = error;
  if (!hadWidget) grow(node);
  node.setDirtyCanvas?.(true, true);
}

function clearErrors() {
  for (const node of allNodes(app.graph)) {
    if (node.actsteerShowsError) showOnNode(node, node.actsteerLastResult ?? "");
  }
}

function showNodeErrors(nodeErrors) {
  for (const [id, entry] of Object.entries(nodeErrors ?? {})) {
    if (!String(entry?.class_type ?? "").startsWith(PACK_PREFIX)) continue;
    const text = errorText(entry);
    if (text) showOnNode(app.graph?.getNodeById?.(id), `Not run: ${text}`, true);
  }
}

let latestFiles = null; // the file list of the last "actsteer.transports" event (for Load nodes added later)

function setLoadOptions(node, files) {
  const widget = node.widgets?.find((w) => w.name === "transport_name");
  if (widget?.options) widget.options.values = [...files];
}

function* allNodes(graph) {
  yield* graph?.nodes ?? [];
  for (const sub of graph?.subgraphs?.values?.() ?? []) yield* sub.nodes ?? [];
}

// Wrap api.queuePrompt (what the Run button calls): attribute and show AcT nodes' queue-time errors, for a graph
// that was refused (HTTP 400) and for one that runs without its failing branch (200 with node_errors).
function watchQueueing() {
  const queuePrompt = api.queuePrompt.bind(api);
  api.queuePrompt = async (...args) => {
    clearErrors();
    try {
      const answer = await queuePrompt(...args);
      showNodeErrors(attributeErrors(answer?.node_errors));
      return answer;
    } catch (error) {
      showNodeErrors(attributeErrors(error?.response?.node_errors));
      throw error;
    }
  };
}

app.registerExtension({
  name: "actsteer.nodes",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData.name).startsWith(PACK_PREFIX)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const out = created?.apply(this, arguments);
      if (RESULT_NODES.has(nodeData.name)) resultWidget(this);
      if (nodeData.name === "ActSteerLoad" && this.size[0] < LOAD_MIN_WIDTH) this.setSize([LOAD_MIN_WIDTH, this.size[1]]);
      return out;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) {
        this.actsteerLastResult = Array.isArray(text) ? text.join("\n") : String(text);
        showOnNode(this, this.actsteerLastResult);
      }
    };
  },

  nodeCreated(node) {
    if (latestFiles && node.comfyClass === "ActSteerLoad") setLoadOptions(node, latestFiles);
  },

  async setup() {
    watchQueueing();
    api.addEventListener("execution_error", ({ detail }) => {
      if (!String(detail?.node_type ?? "").startsWith(PACK_PREFIX)) return;
      showOnNode(app.graph?.getNodeById?.(detail.node_id), `Failed: ${detail.exception_message ?? ""}`.trim(), true);
    });
    api.addEventListener(FILES_EVENT, ({ detail }) => {
      const files = detail?.files;
      if (!Array.isArray(files)) return;
      latestFiles = files;
      for (const node of allNodes(app.graph)) {
        if (node.comfyClass === "ActSteerLoad") setLoadOptions(node, files);
      }
      app.graph?.setDirtyCanvas?.(true, true);
    });
  },
});
