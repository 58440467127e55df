"""Export an AutoencoderKL's encoder and decoder as segments for exact tiling (`vaelink.exact`).

A tiled pass equals the untiled one only if every GroupNorm sees the statistics of the whole image
and the mid-block attention sees every position. So each graph is cut at its normalisation layers:
a segment takes its input map and, when it starts with a GroupNorm, the whole-image per-channel mean
and reciprocal std as graph inputs; the host runs it tile by tile with a halo and reduces the next
norm's statistics between segments. Between two cuts there is at most one 3x3 convolution, so a
halo of one sample (two below a 2x upsample) covers the receptive field. The mid-block attention
is a segment of its own, run once over all positions with ONNX Runtime's MultiHeadAttention (flash
attention on the CPU: no score matrix is ever held).

Fast tiling runs every tile through the whole part at once: beside the segments, each part gets one
fused graph, the segments inlined in order with every norm's mean and rstd as graph inputs
(`mean<k>`, `rstd<k>`) and the attention computed in the graph over the tile's positions. One
runtime call a tile instead of one a segment, and no host copies between them.

Segments are built directly with `onnx.helper` from the module's weights (no tracing: dozens of
small graphs export in a second). Needs torch and onnx, like `vaelink.export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .exact import LAYOUT
from .exports import file_entry

__all__ = ["export_segments", "has_segments"]

OPSET = 17
IR_VERSION = 8
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators


def has_segments(vae: Any) -> bool:
    """Only AutoencoderKL normalises; models without norms tile well blended."""
    return hasattr(vae, "encoder") and hasattr(vae.encoder, "conv_norm_out")


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


class _Builder:
    """Collects the steps of one part; each step's ONNX file goes into `folder/segments/`."""

    def __init__(self, part: str, folder: Path) -> None:
        self.part = part
        self.folder = folder
        self.steps: list[dict[str, Any]] = []
        self.names = 0
        # The fused graph (fast tiling): every segment inlined, stats as inputs.
        self.fused_nodes: list[Any] = []
        self.fused_inits: list[Any] = []
        self.fused_inputs: list[Any] = []
        self.norms = 0
        self.in_channels = 0

    def _buffer(self) -> str:
        self.names += 1
        return f"t{self.names}"

    def conv(
        self,
        src: str,
        conv: Any,
        *,
        kind: str,
        norm: Any = None,
        act: bool = True,
        res: str | None = None,
        shortcut: Any = None,
        out_scale: float = 1.0,
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> str:
        """One segment: [GroupNorm(given stats) + affine (+ SiLU)] [2x nearest] conv [+ res]."""
        from onnx import TensorProto, helper, numpy_helper

        w = _np(conv.weight) if weight is None else weight
        b = _np(conv.bias) if bias is None else bias
        if w.ndim == 2:  # a Linear used as a 1x1 conv
            w = w[:, :, None, None]
        cin, k = w.shape[1], w.shape[2]
        if not self.steps:
            self.in_channels = int(cin)
        dims = ["n", "c", "h", "w"]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, "h", "w"])]
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
        nodes = []
        h = "x"
        if norm is not None:
            inputs += [
                helper.make_tensor_value_info(s, TensorProto.FLOAT, ["n", cin, 1, 1])
                for s in ("mean", "rstd")
            ]
            inits += [
                numpy_helper.from_array(_np(norm.weight).reshape(1, cin, 1, 1), "gamma"),
                numpy_helper.from_array(_np(norm.bias).reshape(1, cin, 1, 1), "beta"),
            ]
            nodes += [
                helper.make_node("Sub", ["x", "mean"], ["centred"]),
                helper.make_node("Mul", ["centred", "rstd"], ["normed"]),
                helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
                helper.make_node("Add", ["scaled", "beta"], ["affine"]),
            ]
            h = "affine"
            if act:
                nodes += [
                    helper.make_node("Sigmoid", [h], ["gate"]),
                    helper.make_node("Mul", [h, "gate"], ["act"]),
                ]
                h = "act"
        if kind == "up":
            inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
            nodes.append(
                helper.make_node(
                    "Resize",
                    [h, "", "scales"],
                    ["up"],
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )
            )
            h = "up"
        # The graph pads as the model does: each row strip (`vaelink.exact`) carries halo rows
        # beyond its own, and an output row next to a strip's edge is thrown away. "down":
        # diffusers pads (0, 1) before its stride-2 convolution.
        pad = (k - 1) // 2
        stride = 2 if kind == "down" else 1
        pads = [0, 0, 1, 1] if kind == "down" else [pad] * 4
        nodes.append(
            helper.make_node("Conv", [h, "W", "B"], ["conv"], pads=pads, strides=[stride, stride])
        )
        h = "conv"
        if res is not None:
            cres = w.shape[0] if shortcut is None else _np(shortcut.weight).shape[1]
            inputs.append(
                helper.make_tensor_value_info("res", TensorProto.FLOAT, ["n", cres, "h2", "w2"])
            )
            r = "res"
            if shortcut is not None:
                inits += [
                    numpy_helper.from_array(_np(shortcut.weight), "SW"),
                    numpy_helper.from_array(_np(shortcut.bias), "SB"),
                ]
                nodes.append(helper.make_node("Conv", ["res", "SW", "SB"], ["short"]))
                r = "short"
            nodes.append(helper.make_node("Add", [r, h], ["sum"]))
            h = "sum"
            if out_scale != 1.0:
                inits.append(numpy_helper.from_array(np.array(out_scale, np.float32), "oscale"))
                nodes.append(helper.make_node("Div", [h, "oscale"], ["scaled_out"]))
                h = "scaled_out"
        nodes.append(helper.make_node("Identity", [h], ["y"]))
        output = helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [dims[0], w.shape[0], "H", "W"]
        )
        graph = helper.make_graph(nodes, f"{self.part}_{len(self.steps)}", inputs, [output], inits)
        return self._add_step(
            graph,
            src,
            res,
            {
                "op": "conv",
                "kind": kind,
                "norm": None
                if norm is None
                else {"groups": int(norm.num_groups), "eps": float(norm.eps)},
                "out_channels": int(w.shape[0]),
            },
        )

    def _add_step(self, graph: Any, src: str, res: str | None, step: dict[str, Any]) -> str:
        """Saves `graph` as the next step's segment file, inlines it in the fused graph and
        records the step reading `src` (and `res`); returns the name of the map it writes."""
        rel = f"segments/{self.part}-{len(self.steps):03d}.onnx"
        _save(graph, self.folder / rel)
        out = self._buffer()
        self._inline(graph, src, res, out)
        self.steps.append(
            {
                **step,
                "input": src,
                "output": out,
                "res": res,
                "layout": LAYOUT,
                **file_entry(self.folder, rel),
            }
        )
        return out

    def _inline(self, graph: Any, src: str, res: str | None, out: str) -> None:
        """Appends one segment to the fused graph: its tensors prefixed, its inputs wired to the
        maps they read, its statistics to new graph inputs."""
        from onnx import TensorProto, helper

        prefix = f"s{len(self.steps) - 1}_"
        names = {"": "", "x": src, "y": out}
        if res is not None:
            names["res"] = res
        for value in graph.input:
            if value.name in ("mean", "rstd"):
                names[value.name] = f"{value.name}{self.norms}"
                shape = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
                self.fused_inputs.append(
                    helper.make_tensor_value_info(names[value.name], TensorProto.FLOAT, shape)
                )
        if "mean" in names:
            self.norms += 1
        for init in graph.initializer:
            renamed = type(init)()
            renamed.CopyFrom(init)
            renamed.name = prefix + init.name
            self.fused_inits.append(renamed)
        for node in graph.node:
            copy = type(node)()
            copy.CopyFrom(node)
            copy.ClearField("input")
            copy.ClearField("output")
            copy.input.extend(names.get(n, prefix + n) for n in node.input)
            copy.output.extend(names.get(n, prefix + n) for n in node.output)
            copy.name = f"{prefix}{node.name or node.op_type}_{len(self.fused_nodes)}"
            self.fused_nodes.append(copy)

    def fused(self) -> dict[str, Any]:
        """Writes `fast-<part>.onnx`; its manifest entry."""
        from onnx import TensorProto, helper

        inputs = [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", self.in_channels, "h", "w"])
        ]
        last = self.steps[-1]
        nodes = [*self.fused_nodes, helper.make_node("Identity", [last["output"]], ["y"])]
        output = helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", last["out_channels"], "H", "W"]
        )
        graph = helper.make_graph(
            nodes, f"{self.part}_fused", inputs + self.fused_inputs, [output], self.fused_inits
        )
        rel = f"segments/{self.part}-fused.onnx"
        _save(graph, self.folder / rel)
        return {**file_entry(self.folder, rel), "norms": self.norms}

    def resnet(self, src: str, r: Any) -> str:
        if r.conv_shortcut is not None and r.conv_shortcut.kernel_size != (1, 1):
            raise NotImplementedError("3x3 resnet shortcuts are not segmented")
        h = self.conv(src, r.conv1, kind="same", norm=r.norm1)
        return self.conv(
            h,
            r.conv2,
            kind="same",
            norm=r.norm2,
            res=src,
            shortcut=r.conv_shortcut,
            out_scale=float(r.output_scale_factor),
        )

    def attention(self, src: str, attn: Any) -> str:
        w = np.concatenate([_np(m.weight) for m in (attn.to_q, attn.to_k, attn.to_v)])
        b = np.concatenate([_np(m.bias) for m in (attn.to_q, attn.to_k, attn.to_v)])
        qkv = self.conv(
            src, attn.to_q, kind="point", norm=attn.group_norm, act=False, weight=w, bias=b
        )
        out = self._attend(qkv, heads=int(attn.heads), channels=w.shape[0] // 3)
        if not attn.residual_connection:
            raise NotImplementedError("attention without a residual connection")
        return self.conv(
            out,
            attn.to_out[0],
            kind="point",
            res=src,
            out_scale=float(attn.rescale_output_factor),
        )

    def _attend(self, qkv: str, *, heads: int, channels: int) -> str:
        """The attention step: one segment run once over the whole map (ONNX Runtime's
        MultiHeadAttention: flash attention on the CPU, memory-efficient kernels on CUDA, so no
        score matrix is held), and the same nodes in the fused graph over a tile's positions."""
        from onnx import TensorProto, helper

        nodes, inits = attention_nodes("x", "y", heads=heads, channels=channels)
        graph = helper.make_graph(
            nodes,
            f"{self.part}_{len(self.steps)}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3 * channels, "h", "w"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", channels, "h", "w"])],
            inits,
        )
        return self._add_step(graph, qkv, None, {"op": "attend", "heads": heads})

    def mid(self, src: str, mid: Any) -> str:
        h = self.resnet(src, mid.resnets[0])
        for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            if attn is not None:
                h = self.attention(h, attn)
            h = self.resnet(h, resnet)
        return h


def attention_nodes(
    qkv: str, out: str, *, heads: int, channels: int
) -> tuple[list[Any], list[Any]]:
    """Nodes (and their constants) computing softmax(q k^T / sqrt(d)) v from `qkv` `[n, 3C, h, w]`
    (q, k and v stacked on channels, heads within each) into `out` `[n, C, h, w]`, with ONNX
    Runtime's MultiHeadAttention over the `h * w` positions."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([0, 3 * channels, -1], np.int64), "flat"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
        numpy_helper.from_array(np.array([2], np.int64), "s2"),
        numpy_helper.from_array(np.array([4], np.int64), "s4"),
        numpy_helper.from_array(np.array([channels], np.int64), "c"),
    ]
    node = helper.make_node
    nodes = [
        node("Reshape", [qkv, "flat"], ["tokens_first"]),  # [n, 3C, hw]
        node("Transpose", ["tokens_first"], ["tokens"], perm=[0, 2, 1]),
        node("Split", ["tokens"], ["q", "k", "v"], axis=2),
        node(
            "MultiHeadAttention",
            ["q", "k", "v"],
            ["attended"],  # [n, hw, C]
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=float((channels // heads) ** -0.5),  # F.scaled_dot_product_attention's default
        ),
        node("Transpose", ["attended"], ["channels_first"], perm=[0, 2, 1]),
        node("Shape", [qkv], ["shape"]),
        node("Slice", ["shape", "s0", "s1"], ["n"]),
        node("Slice", ["shape", "s2", "s4"], ["hw"]),
        node("Concat", ["n", "c", "hw"], ["4d"], axis=0),
        node("Reshape", ["channels_first", "4d"], [out]),
    ]
    return nodes, inits


def _save(graph: Any, path: Path) -> Path:
    from onnx import helper

    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = IR_VERSION
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _check_plain(vae: Any) -> None:
    for module in vae.modules():
        name = type(module).__name__
        if name == "Attention" and (
            module.spatial_norm is not None
            or module.norm_q is not None
            or module.only_cross_attention
        ):
            raise NotImplementedError("attention variants are not segmented")
        if name == "ResnetBlock2D" and (module.upsample or module.downsample):
            raise NotImplementedError("resampling resnets are not segmented")


def export_segments(
    vae: Any, folder: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Writes `folder/segments/*.onnx`; returns the programs (part -> steps, `vaelink.exact`) and
    the fused graphs (part -> file entry)."""
    _check_plain(vae)
    enc = _Builder("encoder", folder)
    h = enc.conv("x", vae.encoder.conv_in, kind="same")
    for block in vae.encoder.down_blocks:
        for r in block.resnets:
            h = enc.resnet(h, r)
        for d in block.downsamplers or []:
            if d.padding != 0 or d.conv.stride != (2, 2):
                raise NotImplementedError("only diffusers' asymmetric-pad downsampler")
            h = enc.conv(h, d.conv, kind="down")
    h = enc.mid(h, vae.encoder.mid_block)
    h = enc.conv(h, vae.encoder.conv_out, kind="same", norm=vae.encoder.conv_norm_out)
    if getattr(vae, "quant_conv", None) is not None:
        enc.conv(h, vae.quant_conv, kind="point")

    dec = _Builder("decoder", folder)
    h = "x"
    if getattr(vae, "post_quant_conv", None) is not None:
        h = dec.conv(h, vae.post_quant_conv, kind="point")
    h = dec.conv(h, vae.decoder.conv_in, kind="same")
    h = dec.mid(h, vae.decoder.mid_block)
    for block in vae.decoder.up_blocks:
        for r in block.resnets:
            h = dec.resnet(h, r)
        for u in block.upsamplers or []:
            if u.conv is None or u.interpolate is False or u.use_conv_transpose:
                raise NotImplementedError("only nearest 2x upsampling followed by a conv")
            dec.conv(h, u.conv, kind="up")
            h = dec.steps[-1]["output"]
    dec.conv(h, vae.decoder.conv_out, kind="same", norm=vae.decoder.conv_norm_out)
    return {"encoder": enc.steps, "decoder": dec.steps}, {
        "encoder": enc.fused(),
        "decoder": dec.fused(),
    }
