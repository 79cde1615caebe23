// actsteer's ComfyUI frontend extension (served from web/, registered by WEB_DIRECTORY in the pack's __init__.py).
//
// 1. AcT Learn Transport and AcT Save Transport show their result line on the node ("saved styles/x (256 layers)",
//    "learned ... encode 1.2 s · sample 30.4 s · fit 0.3 s"): the server sends it as the node's `text` ui output.
// 2. After AcT Save writes a file, the server broadcasts the event "actsteer.transports" with the new file
//    list; every AcT Load Transport dropdown in every open tab follows it, without Refresh Node Definitions.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/actsteer.js
import { api } from "../../../scripts/api.js";

const RESULT_NODES = new Set(["ActSteerLearn", "ActSteerSave"]);
const RESULT_WIDGET = "actsteer_result";
const FILES_EVENT = "actsteer.transports";

function resultWidget(node) {
  const existing = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (existing) return existing;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.rows = 2;
  box.placeholder = "the result shows here after a run";
  box.style.cssText = "width:100%;resize:none;font-size:11px;opacity:0.85;background:transparent;border:none;";
  const widget = node.addDOMWidget(RESULT_WIDGET, "actsteer_text", box, {
    serialize: false, // never sent to the server in the prompt (options.serialize; not a duplicate of the line below)
    getValue: () => box.value,
    setValue: (value) => { box.value = value ?? ""; },
  });
  widget.serialize = false; // never stored in the workflow's widgets_values
  return widget;
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

app.registerExtension({
  name: "actsteer.nodes",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!RESULT_NODES.has(nodeData.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const out = created?.apply(this, arguments);
      resultWidget(this);
      return out;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      executed?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) resultWidget(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },

  nodeCreated(node) {
    if (latestFiles && node.comfyClass === "ActSteerLoad") setLoadOptions(node, latestFiles);
  },

  async setup() {
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
