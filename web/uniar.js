// The UniAR pack's frontend extension (frontends 1.27 .. 1.58).
//
// 1. Shows the answer of "UniAR Caption / VQA" on the node itself. The node returns its answer as ui.PreviewText
//    ({"text": [...]}), which the frontends draw only on their own text nodes. This adds a read-only multiline
//    STRING widget to the Caption node (made by the frontend's own ComfyWidgets.STRING, as its text-preview node
//    PreviewAny does, so both renderers draw it: the classic LiteGraph canvas as a textarea over the canvas, Nodes
//    2.0 (Comfy.VueNodes.Enabled) as a textarea inside the node) and sets its value when the node has run. The
//    widget is not part of the workflow's widget values (serialize: false), so saved workflows keep their layout
//    and stay loadable without this extension. The answer is only ever set as a value, never as HTML.
// 2. When a loaded workflow names a UniAR checkpoint folder that is not installed, says where to put it (the
//    frontend's own missing-model dialog knows single files only, so templates do not use it).
import { app } from "../../scripts/app.js";

// ComfyWidgets: from the frontend's public API object where it has one, else from the legacy module path (which
// frontends >= 1.49 mark as internal); guarded, so a frontend without either still loads the extension's other
// part (the missing-checkpoint notice) and says why the answer box is missing.
const ComfyWidgets = window.comfyAPI?.widgets?.ComfyWidgets ??
  (await import("../../scripts/widgets.js").catch(() => ({}))).ComfyWidgets;

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
  if (!ComfyWidgets?.STRING) {
    console.warn("[UniAR] this frontend offers no ComfyWidgets.STRING: the Caption answer is only in its output");
    return null;
  }
  widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true, placeholder: PLACEHOLDER }], app).widget;
  widget.options ??= {};
  widget.options.read_only = true;
  widget.options.placeholder = PLACEHOLDER;
  widget.label = "answer"; // the name shown by Nodes 2.0 (the widget's name stays uniar_answer)
  widget.serialize = false; // never written into widgets_values
  widget.options.serialize = false;
  const box = widget.element;
  if (box) {
    box.readOnly = true;
    box.placeholder = PLACEHOLDER;
    box.dataset.uniarAnswer = "";
  }
  return widget;
}

function showAnswer(node, text) {
  const widget = answerWidget(node);
  if (!widget) return;
  widget.value = text;
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
