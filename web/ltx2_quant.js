// LTX-2 Quant frontend extension.
// - Shows each node's decision text (policy, formats, kernel paths) under the node after it runs.
// - Shows the estimated VRAM on the loader / quantize nodes for their policy and the graph's video size,
//   and flags invalid frame counts and sizes on EmptyLTXVLatentVideo and the two-stage sampler while
//   they are edited. The numbers and the rules come from the server (GET /ltx2_quant/estimate, backed
//   by quant/memory.py); this file only asks and displays.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ESTIMATE_ROUTE = "/ltx2_quant/estimate";
const LATENT = "EmptyLTXVLatentVideo";
const TWO_STAGE = "LTX2QuantTwoStageSampler";
const POLICY_NODES = ["LTX2QuantLoader", "LTX2QuantQuantizeModel"];
const SCOPE_WIDGETS = ["nvfp4_mode", "scope", "include", "exclude", "keep_first_blocks", "keep_last_blocks",
                       "keep_audio", "text_connectors_on_cpu", "smooth", "low_rank"];
const DEFAULT_SIZE = { width: 768, height: 512, frames: 121 };
const STATUS_WIDGET = "ltx2quant_vram";

app.registerExtension({
  name: "ltx2quant.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("LTX2Quant")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "ltx2quant_report");
      if (!widget) {
        widget = this.addWidget("text", "ltx2quant_report", "", () => {}, { multiline: true });
        widget.inputEl && (widget.inputEl.readOnly = true);
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});

const widgetValue = (node, name) => node.widgets?.find((w) => w.name === name)?.value;
const nodeClass = (node) => node.comfyClass ?? node.type;
const graphNodes = () => app.graph?.nodes ?? app.graph?._nodes ?? [];
const gib = (value) => value.toFixed(1);

// A read-only line under the node; not saved with the workflow nor sent with the prompt.
function statusWidget(node) {
  let widget = node.widgets?.find((w) => w.name === STATUS_WIDGET);
  if (!widget) {
    const element = document.createElement("div");
    element.style.cssText = "font: 11px monospace; white-space: pre-wrap; padding: 2px 6px; overflow: hidden;";
    widget = node.addDOMWidget(STATUS_WIDGET, STATUS_WIDGET, element, {
      serialize: false, hideOnZoom: false, getValue: () => element.textContent, setValue: () => {},
      getMinHeight: () => 34, getMaxHeight: () => 80,
    });
    widget.serialize = false;
    node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  }
  return widget;
}

function show(node, text, isError) {
  const { element } = statusWidget(node);
  element.textContent = text;
  element.style.color = isError ? "#ff6b6b" : "";
  element.dataset.error = isError ? "true" : "false";
  node.setDirtyCanvas(true, true);
}

// Ask the server once per changed query; a newer query for the same node wins over a late answer.
async function ask(node, params, render) {
  const query = new URLSearchParams(params).toString();
  if (node.ltx2quantQuery === query) return;
  node.ltx2quantQuery = query;
  try {
    const answer = await (await api.fetchApi(`${ESTIMATE_ROUTE}?${query}`)).json();
    if (node.ltx2quantQuery === query) render(answer);
  } catch (error) {
    if (node.ltx2quantQuery === query) show(node, `VRAM estimate unavailable: ${error}`, true);
  }
}

function sizeParams(latent, twoStage) {
  const size = latent
    ? { width: widgetValue(latent, "width"), height: widgetValue(latent, "height"), frames: widgetValue(latent, "length") }
    : DEFAULT_SIZE;
  return { ...size, two_stage: twoStage };
}

function refresh() {
  const nodes = graphNodes();
  const latent = nodes.find((n) => nodeClass(n) === LATENT);
  const twoStage = nodes.some((n) => nodeClass(n) === TWO_STAGE);
  const size = sizeParams(latent, twoStage);
  const sizeText = `${size.width}x${size.height}x${size.frames}`;
  const source = latent ? `${LATENT} #${latent.id}` : `default size; no ${LATENT} in the graph`;
  for (const node of nodes) {
    const kind = nodeClass(node);
    if (kind === TWO_STAGE && !latent) {
      node.ltx2quantQuery = null;
      show(node, `no ${LATENT} in the graph: size not checked`, false);
    } else if (kind === LATENT || kind === TWO_STAGE) {
      const checked = kind === TWO_STAGE ? size : sizeParams(node, twoStage);
      ask(node, { ...checked, policy: "bf16" }, (answer) => {
        if (answer.errors.length) show(node, `invalid size: ${answer.errors.join("; ")}`, true);
        else show(node, `ok: ${checked.width}x${checked.height}x${checked.frames}, ${answer.video_tokens} tokens` +
                        (checked.two_stage ? ", two-stage (multiples of 64)" : "") +
                        (kind === TWO_STAGE ? ` (${source})` : ""), false);
      });
    } else if (POLICY_NODES.includes(kind)) {
      const params = { ...size, policy: widgetValue(node, "policy") };
      for (const name of SCOPE_WIDGETS) {
        const value = widgetValue(node, name);
        if (value !== undefined) params[name] = value;
      }
      ask(node, params, (answer) => {
        if (answer.errors.length) {
          show(node, `VRAM not estimated for ${sizeText}: ${answer.errors.join("; ")}`, true);
          return;
        }
        const policy = params.policy === "auto" ? `auto -> ${answer.policy}` : answer.policy;
        show(node, `VRAM ~ ${gib(answer.total_gib)} GiB (${policy}: weights ${gib(answer.weights_gib)} + ` +
                   `activations ${gib(answer.activations_gib + answer.overhead_gib)}) at ${sizeText}` +
                   `${size.two_stage ? " two-stage" : ""} (${source})`, false);
      });
    }
  }
}

let pending = null;
function scheduleRefresh() {
  clearTimeout(pending);
  pending = setTimeout(refresh, 150);
}

function chain(original, extra) {
  return function () {
    const result = original?.apply(this, arguments);
    extra();
    return result;
  };
}

app.registerExtension({
  name: "ltx2quant.vram",
  setup() {
    api.addEventListener("graphChanged", scheduleRefresh);
  },
  nodeCreated(node) {
    if (![LATENT, TWO_STAGE, ...POLICY_NODES].includes(nodeClass(node))) return;
    node.onWidgetChanged = chain(node.onWidgetChanged, scheduleRefresh);
    node.onRemoved = chain(node.onRemoved, scheduleRefresh);
    scheduleRefresh();
  },
});
