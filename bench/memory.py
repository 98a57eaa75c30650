"""Peak memory of a quantization run, predicted from the model's shapes (and measured on a small one).

    python bench/memory.py --preset mixtral-8x7b --nsamples 128 --seqlen 2048 --gptq   # formula only
    python bench/memory.py --model demo-mixtral --nsamples 32 --seqlen 512 --measure   # formula vs measured
    python bench/memory.py --model demo-mixtral --stream --measure                     # layers read from disk

Only one decoder layer and the calibration activations live on the accelerator, so
    device peak ~ largest layer's weights
                + (nsamples + 1) x seqlen x hidden x act_bytes (the calibration activations, advanced
                                                                through the layer in place: one copy and
                                                                one sequence's output)
                + nsamples x seqlen x max(hidden, o_proj's input width) x act_bytes (the sequential
                  fit order's record of the attention, which its refresh passes replay:
                  duquant/attention_replay.py)
                + the larger of (not at the same time):
                  2 x largest matrix in fp32                   (the transformed working copy and its quantized result)
                  the rotation fit of the widest group of same-width sites searched together (the
                  experts' down_proj inputs, as many as FIT_BATCH_ENTRIES allows: rotation_tokens
                  rows each, ~20 bytes per entry: float32 and float64 rows, the float32 search
                  input and its spare; the search runs on the layer's device)
                + with --gptq: 4 bytes x in^2 per Hessian of the largest layer (one per expert and input)
    host peak   ~ the whole model + the sampled statistics (rotation_tokens rows per site, fp32; an
                  expert's smoothed rows replace its raw ones)
                (+ the device terms above when the device is the CPU);
                with --stream the whole model is replaced by what lives outside the decoder layers
                (embeddings, head) plus the one layer read from disk.
--measure loads and quantizes the model on --device and prints the formula next to what the run
used: the allocator's peak on a GPU, and the peak RSS above the interpreter's on the host.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
PRESETS = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2),
}


def matrices(layer: torch.nn.Module) -> list[tuple[int, int, int]]:
    """(count, out, in) of every weight matrix of a layer; fused experts [E, out, in] count E times."""
    out = []
    for _, p in layer.named_parameters():
        if p.dim() == 2:
            out.append((1, p.shape[0], p.shape[1]))
        elif p.dim() == 3:
            out.append((p.shape[0], p.shape[1], p.shape[2]))
    return out


def site_inputs(model, spec, index: int) -> tuple[list[tuple[int, int]], int]:
    """(count, width) of the distinct inputs of layer `index`, as statistics and Hessians see them:
    its declared sites (models/sites.py), the routed experts' sites of one kind counted together;
    and o_proj's input width. Unfused on the meta device when the model is there, so no expert
    weight is allocated."""
    from collections import Counter

    from models.experts import unfuse_experts
    from models.sites import layer_sites
    from models.spec import decoder_layers, resolve

    with torch.device(next(model.parameters()).device):
        unfuse_experts(model, spec, index)
    view = resolve(spec, decoder_layers(model, spec)[index], model.config, index)
    counts = Counter((site.expert is not None, site.fold, site.hook.weight.shape[1]) for site in layer_sites(view))
    return [(count, width) for (_, _, width), count in counts.items()], view.attn_out.weight.shape[1]


def predict(model, spec, nsamples: int, seqlen: int, rotation_tokens: int, gptq: bool, cpu: bool,
            stream: bool = False) -> dict:
    from duquant.fitting import sites_per_search
    from models.spec import decoder_layers

    layers = decoder_layers(model, spec)
    wbytes = next(model.parameters()).element_size()
    hidden = model.config.hidden_size
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    big = max(range(len(layers)), key=per_layer.__getitem__)
    mats = matrices(layers[big])
    inputs, o_width = site_inputs(model, spec, big)
    d = {
        "layer_weights": per_layer[big] * wbytes,
        "activations": (nsamples + 1) * seqlen * hidden * wbytes,
        "attention_record": nsamples * seqlen * max(hidden, o_width) * wbytes,
        "working_copy": 2 * 4 * max(o * i for _, o, i in mats),
        "gptq_hessians": sum(count * 4 * width**2 for count, width in inputs) if gptq else 0,
    }
    model_bytes = sum(p.numel() for p in model.parameters()) * wbytes
    stats = sum(count * rotation_tokens * width * 4 for count, width in inputs)
    fit = max(min(count, sites_per_search(rotation_tokens * width)) * width for count, width in inputs) * rotation_tokens * 20
    device = (d["layer_weights"] + d["activations"] + d["attention_record"] + max(d["working_copy"], fit)
              + d["gptq_hessians"])
    resident = model_bytes - (sum(per_layer) - per_layer[big]) * wbytes if stream else model_bytes
    host = resident + stats + (device - d["layer_weights"] if cpu else 0)
    return {"model_bytes": model_bytes, "host_model_bytes": resident, **d, "stats": stats,
            "rotation_fit": fit, "device_peak": device, "host_peak": host}


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM, which ru_maxrss reads), so a later reading is
    the peak of what ran since (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        raise SystemExit(f"error: cannot reset the peak-RSS count ({e}); this needs Linux >= 4.0") from None


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model to load (needed for --measure)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shapes only, no weights")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rotation_tokens", type=int, default=2048)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", action="store_true")
    p.add_argument("--stream", action="store_true", help="decoder layers read from disk one at a time (main.py --stream)")
    args = p.parse_args()
    from models import get_spec, load_model

    dtype = getattr(torch, args.dtype)
    cpu = torch.device(args.device).type == "cpu"
    if args.preset:
        from transformers import AutoConfig, AutoModelForCausalLM

        kw = dict(PRESETS[args.preset])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = None
    else:
        if args.measure:
            reset_peak_rss()
            interpreter = rss_bytes("VmRSS")
            if not cpu:  # the CUDA context and cuBLAS cost host memory of their own, whatever the model
                torch.ones(8, 8, device=args.device) @ torch.ones(8, 8, device=args.device)
                runtime = rss_bytes("VmRSS") - interpreter
        model, tok = load_model(args.model or "demo-mixtral", dtype, stream=args.stream)
    spec = get_spec(model)
    pred = predict(model, spec, args.nsamples, args.seqlen, args.rotation_tokens, args.gptq, cpu, args.stream)
    name = args.preset or args.model or "demo-mixtral"
    print(f"{name}: {sum(x.numel() for x in model.parameters()) / 1e9:.2f}B params in {args.dtype}, "
          f"{args.nsamples} x {args.seqlen} calibration tokens{', GPTQ' if args.gptq else ''}, device {args.device}"
          f"{', layers streamed from disk' if args.stream else ''}")
    print("| term | GiB |\n|---|---|")
    for k, v in pred.items():
        print(f"| {k} | {v / GiB:.3f} |")
    if not args.measure:
        return
    if args.preset:
        raise SystemExit("--measure needs --model (a preset has no weights)")
    from duquant.config import DuQuantConfig, GPTQConfig, QuantConfig
    from duquant.data import calibration_segments
    from duquant.pipeline import quantize_model

    calib = calibration_segments("c4", tok, args.nsamples, args.seqlen, 0)
    t = time.time()
    quantize_model(model, spec, calib, QuantConfig(4, 4), DuQuantConfig(rotation_tokens=args.rotation_tokens),
                   device=args.device, gptq=GPTQConfig() if args.gptq else None)
    seconds = time.time() - t
    grown = rss_bytes("VmHWM") - interpreter
    print(f"\nmeasured ({seconds:.0f} s): host peak RSS above the interpreter's, loading and quantizing, "
          f"{grown / GiB:.3f} GiB (formula {pred['host_peak'] / GiB:.3f} GiB)")
    if not cpu:
        print(f"of which the CUDA runtime (context, cuBLAS) {runtime / GiB:.3f} GiB; "
              f"the rest {(grown - runtime) / GiB:.3f} GiB")
        print(f"device allocator peak {torch.cuda.max_memory_allocated() / GiB:.3f} GiB "
              f"(formula {pred['device_peak'] / GiB:.3f} GiB); still allocated after quantizing "
              f"{torch.cuda.memory_allocated() / GiB:.3f} GiB (the model is back on the CPU)")


if __name__ == "__main__":
    main()
