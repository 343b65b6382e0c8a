"""`rlk2 export CKPT --out DIR`: a checkpoint as it would be deployed, its quantized weights rounded to INT4.

- `--format int4` (default): the weights of the quantized modules packed as 4-bit integers in the compressed-tensors
  `pack-quantized` format (`weight_packed` int32, `weight_scale`, `weight_shape` per linear, a
  `quantization_config` in config.json): the layout Kimi K2-Thinking ships, loadable by transformers with the
  `compressed-tensors` package installed (it dequantizes on load) and by vLLM;
- `--format dequantized`: an ordinary checkpoint whose quantized weights hold their dequantized INT4 values.

Both hold exactly the values a QAT run trained with (rlk2.qat: the scales come from the master weights, with
compressed-tensors' own quantizer). CKPT is what `rlk2 eval` accepts (a run directory gives its latest checkpoint,
and its `qat:` settings as the defaults). rlk2 writes the safetensors itself because transformers saves the
fused 3-D experts as per-expert linears and no library packs a saved checkpoint in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import safetensors.torch

from rlk2.errors import UserError
from rlk2.eval_checkpoints import resolve_checkpoint, run_qat
from rlk2.policy import load_policy
from rlk2.qat import int4_qparams, quant_args, quantize_for_eval, select_weights


def run(args: argparse.Namespace) -> int:
    ckpt = resolve_checkpoint(args.checkpoint)
    if ckpt.kind != "hf":
        raise UserError(f"checkpoint {args.checkpoint}: a PEFT adapter; merge it into its base model first")
    qat = (run_qat(ckpt.run_dir) if ckpt.run_dir else None) or {"modules": ["experts"], "group_size": 32}
    modules = [m.strip() for m in args.modules.split(",") if m.strip()] if args.modules else qat["modules"]
    group = args.group_size or qat["group_size"]
    if group < 1:
        raise UserError("--group-size: must be >= 1")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not an empty directory")
    model, tokenizer = load_policy(ckpt.path, dtype=ckpt.dtype)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if args.format == "dequantized":
            quantize_for_eval(model, modules, group, what="--modules", group_key="--group-size")
            model.save_pretrained(tmp)
        else:
            owners = [n.rsplit(".", 1)[0] for n, _, _ in select_weights(model, modules, group, what="--modules")]
            model.save_pretrained(tmp)
            _pack_int4(tmp, sorted(set(owners)), group)
        tokenizer.save_pretrained(tmp)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {ckpt.label} ({args.format}, {', '.join(modules)} in INT4 groups of {group}) to {out}")
    return 0


def _quantized_linear(key: str, owners: list[str]) -> bool:
    """A saved `<module>.weight` inside one of the quantized modules (fused experts are saved per expert)."""
    module = key.removesuffix(".weight")
    return key.endswith(".weight") and any(module == o or module.startswith(o + ".") for o in owners)


def _pack_int4(directory: Path, owners: list[str], group: int) -> None:
    """Rewrite the saved safetensors of `directory` with every weight inside `owners` packed (compressed-tensors'
    pack-quantized layout) and add the matching quantization_config to its config.json."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    targets = ["re:^" + "|".join(o.replace(".", r"\.") for o in owners) + r"(\..*)?$"]
    scheme = QuantizationScheme(targets=["Linear"], weights=quant_args(group))
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    packed = []
    for file in sorted(directory.glob("*.safetensors")):
        state = safetensors.torch.load_file(file)
        for key in [k for k in state if _quantized_linear(k, owners)]:
            w = state.pop(key)
            scale, zero = int4_qparams(w, group)
            parts = PackedQuantizationCompressor.compress(
                {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero}, scheme
            )
            prefix = key.removesuffix("weight")
            for name, tensor in parts.items():
                state[prefix + name] = tensor.contiguous()
                if weight_map is not None:
                    weight_map[prefix + name] = file.name
            if weight_map is not None:
                weight_map.pop(key, None)
            packed.append(key)
        safetensors.torch.save_file(state, file, metadata={"format": "pt"})
    if not packed:
        raise UserError(f"--modules: no saved weight lies inside {', '.join(owners)}")
    if weight_map is not None:
        index.write_text(json.dumps({**json.loads(index.read_text()), "weight_map": weight_map}, indent=2))
    config_groups = {"group_0": QuantizationScheme(targets=targets, weights=quant_args(group))}
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {**qc.model_dump(mode="json"), "quant_method": "compressed-tensors"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
