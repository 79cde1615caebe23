// Pure helpers for queue-time errors on AcT nodes (no imports: actsteer.js uses them, scripts/comfy_browser_check.mjs
// tests them in the browser).
//
// ComfyUI (0.3.75) attaches the one message a node's validate_inputs returns to EVERY input that validate_inputs
// reads, so "Need at least 2 source prompts in source_prompts" also lands on target_prompts, and the frontend rings
// both inputs in red. Each AcT message names the input(s) to change; `attributeErrors` keeps it on those only.

const PACK_PREFIX = "ActSteer";

// The message of one error, without ComfyUI's "<input> - " prefix.
export function messageOf(error) {
  const details = String(error?.details ?? "");
  const input = error?.extra_info?.input_name;
  return input && details.startsWith(`${input} - `) ? details.slice(input.length + 3) : details;
}

// Whether `message` names the input `name` as a word ("steps" is not named by "collect_steps").
export function mentions(message, name) {
  const escaped = String(name).replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp(`(^|[^A-Za-z0-9_])${escaped}($|[^A-Za-z0-9_])`, "i").test(message);
}

// Rewrite a /prompt answer's node_errors in place: for AcT nodes, a custom validation message stays only on the
// inputs it names (all of them when it names none). Returns the same object.
export function attributeErrors(nodeErrors) {
  for (const entry of Object.values(nodeErrors ?? {})) {
    if (!String(entry?.class_type ?? "").startsWith(PACK_PREFIX) || !Array.isArray(entry.errors)) continue;
    const byMessage = new Map();
    for (const error of entry.errors) {
      if (error?.type !== "custom_validation_failed") continue;
      const message = messageOf(error);
      if (!byMessage.has(message)) byMessage.set(message, []);
      byMessage.get(message).push(error);
    }
    const dropped = new Set();
    for (const [message, errors] of byMessage) {
      const named = errors.filter((e) => mentions(message, e?.extra_info?.input_name ?? ""));
      if (named.length) for (const e of errors) if (!named.includes(e)) dropped.add(e);
    }
    entry.errors = entry.errors.filter((e) => !dropped.has(e));
  }
  return nodeErrors;
}

// One line per distinct message of a node's errors (what the node shows), or "" when there is none.
export function errorText(entry) {
  const lines = [];
  for (const error of entry?.errors ?? []) {
    const text = error?.type === "custom_validation_failed" ? messageOf(error) : `${error?.message}: ${error?.details}`;
    if (text && !lines.includes(text)) lines.push(text);
  }
  return lines.join("\n");
}
