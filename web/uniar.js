// The UniAR pack's frontend extension (frontends 1.27 .. 1.58).
//
// 1. Shows the answer of "UniAR Caption / VQA" on the node itself. The node returns its answer as ui.PreviewText
//    ({"text": [...]}), which the frontends draw only on their own text nodes. This adds a read-only text box to
//    the Caption node and fills it when the node has run. The box is not part of the workflow's widget values
//    (serialize: false), so saved workflows keep their layout and stay loadable without this extension.
// 2. When a loaded workflow names a UniAR checkpoint folder that is not installed, says where to put it (the
//    frontend's own missing-model dialog knows single files only, so templates do not use it).
import { app } from "../../scripts/app.js";

const NODE_ID = "UniARCaption";
const WIDGET = "uniar_answer";
const PLACEHOLDER = "The answer appears here when the node has run.";

function answerOf(message) {
  const t = message?.text;
  if (Array.isArray(t)) return t.filter((s) => typeof s === "string").join("\n\n");
  return typeof t === "string" ? t : null;
}

function answerWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.placeholder = PLACEHOLDER;
  box.className = "comfy-multiline-input uniar-answer";
  box.dataset.uniarAnswer = "";
  Object.assign(box.style, {
    width: "100%", height: "100%", minHeight: "72px", boxSizing: "border-box", resize: "none",
    fontSize: "13px", lineHeight: "1.35", padding: "6px",
  });
  widget = node.addDOMWidget(WIDGET, "customtext", box, {
    getValue: () => box.value,
    setValue: (v) => { box.value = v ?? ""; },
    getMinHeight: () => 80,
    serialize: false,
  });
  widget.serialize = false; // never written into widgets_values
  widget.serializeValue = () => undefined;
  return widget;
}

function showAnswer(node, text) {
  const widget = answerWidget(node);
  widget.element.value = text;
  widget.element.title = text;
  const [w, h] = node.size;
  const min = node.computeSize?.() ?? [w, h];
  node.setSize?.([Math.max(w, min[0]), Math.max(h, min[1])]);
  node.setDirtyCanvas?.(true, true);
}

const LOADER_ID = "UniARModelLoader";
const MISSING_COLOR = "#5a2a2a";

function missingCheckpoint(node) {
  if (node?.type !== LOADER_ID && node?.comfyClass !== LOADER_ID) return null;
  const w = node.widgets?.find((x) => x.name === "ckpt_name");
  const values = w?.options?.values;
  if (!w || !Array.isArray(values) || typeof w.value !== "string" || !w.value) return null;
  return values.includes(w.value) ? null : w.value;
}

function notifyMissing(names, installed) {
  const list = [...new Set(names)].join(", ");
  const detail = `UniAR checkpoint folder ${list} is not installed. Put the whole folder (config.json, ` +
    `model*.safetensors, bsq_encoder/, sd3_transformer/, sd3_pipeline/) into ComfyUI/models/uniar/ ` +
    `(or a 'uniar' path of extra_model_paths.yaml) and press R to refresh, or replace the loader with the ` +
    `"UniAR Download Model" node.` + (installed.length ? ` Installed: ${installed.join(", ")}.` : "");
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity: "warn", summary: "UniAR model missing", detail, life: 15000 });
  console.warn(`[UniAR] ${detail}`);
}

app.registerExtension({
  name: "UniAR.Nodes",
  async afterConfigureGraph() {
    const nodes = app.graph?._nodes ?? app.graph?.nodes ?? [];
    const missing = [];
    let installed = [];
    for (const node of nodes) {
      const name = missingCheckpoint(node);
      if (name === null) continue;
      missing.push(name);
      installed = node.widgets.find((x) => x.name === "ckpt_name").options.values;
      node.bgcolor = MISSING_COLOR;
    }
    if (missing.length) notifyMissing(missing, installed);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      answerWidget(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = answerOf(message);
      if (text !== null) showAnswer(this, text);
      return r;
    };
  },
});
