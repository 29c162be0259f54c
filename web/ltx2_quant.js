// LTX-2 Quant frontend extension: shows each node's decision text (policy, formats, kernel paths)
// under the node after it runs.
import { app } from "../../scripts/app.js";

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
