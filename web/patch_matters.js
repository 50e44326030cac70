// Shows the text that Patch Matters nodes return (captions, filter reports) on the nodes
// themselves, and a colour legend of the patch boxes under the inputs of Patch Divide.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

// Node class -> label of the read-only text box that shows its "ui.text" output.
const TEXT_NODES = {
  PatchMattersHierarchicalAggregate: "caption",
  PatchMattersCaption: "caption",
  PatchMattersSemanticFilter: "filter report",
};

// Patch colours, the same as PATCH_COLOURS in nodes/preview.py.
const PATCH_LEGEND = [
  ["semantic", "rgb(230,159,0)"],
  ["top left", "rgb(86,180,233)"],
  ["top right", "rgb(0,158,115)"],
  ["bottom left", "rgb(240,228,66)"],
  ["bottom right", "rgb(204,121,167)"],
];
const LEGEND_HEIGHT = 22;


const OUTPUT_WIDGET = "pm_output";

function showText(node, label, texts) {
  let widget = node.widgets?.find((w) => w.name === OUTPUT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, OUTPUT_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.label = label;
    // Output only: not saved in the workflow's widget values, not sent with the prompt.
    widget.serialize = false;
    widget.options = { ...(widget.options ?? {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
      widget.inputEl.placeholder = `The ${label} appears here after a run.`;
    }
  }
  // One text per image; a batch is shown as numbered blocks.
  const list = Array.isArray(texts) ? texts : [texts];
  widget.value =
    list.length === 1 ? String(list[0]) : list.map((text, index) => `[image ${index + 1}]\n${text}`).join("\n\n");
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0], 360), Math.max(node.size[1], size[1], 220)]);
  node.setDirtyCanvas(true, true);
}

// A canvas widget under the inputs of Patch Divide: one colour swatch per patch name.
function legendWidget() {
  return {
    name: "pm_patch_legend",
    type: "pm_patch_legend",
    value: "",
    serialize: false,
    options: { serialize: false },
    computeSize(width) {
      return [width, LEGEND_HEIGHT];
    },
    draw(ctx, node, width, y) {
      let x = 15;
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.textBaseline = "middle";
      for (const [name, colour] of PATCH_LEGEND) {
        ctx.fillStyle = colour;
        ctx.fillRect(x, y + 5, 12, 12);
        ctx.fillStyle = LiteGraph.WIDGET_TEXT_COLOR ?? "#ddd";
        ctx.fillText(name, x + 16, y + 11);
        x += 16 + ctx.measureText(name).width + 12;
        if (x > width - 20) break;
      }
      ctx.restore();
    },
  };
}

app.registerExtension({
  name: "PatchMatters.NodeOutputs",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const label = TEXT_NODES[nodeData.name];
    if (label) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.text) showText(this, label, message.text);
      };
    }

    if (nodeData.name === "PatchMattersDivide") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        this.addCustomWidget(legendWidget());
        this.setSize([Math.max(this.size[0], 440), this.size[1]]);
        return result;
      };
    }
  },
});
