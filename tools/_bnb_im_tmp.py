import torch, sys
from quantization.settings import QuantSettings
from quantization.loader import load_pipeline
from quantization.generate import GenerationRequest, resolve
from quantization.stepping import StepBatch
for b, t in (("bitsandbytes_4bit", "nf4"), ("bitsandbytes_4bit", "fp4"), ("bitsandbytes_8bit", "int8"), ("torchao", "int4wo"), ("torchao", "float8dq")):
    try:
        loaded = load_pipeline(QuantSettings(quant_backend=b, quant_type=t, device="cuda"))
    except Exception as e:
        print(b, t, "LOAD FAIL", type(e).__name__, str(e)[:120]); continue
    for mode in ("no_grad", "inference_mode"):
        ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
        try:
            with ctx:
                sb = StepBatch(loaded)
                sb.add("a", resolve(loaded.defaults, GenerationRequest("x", seed=1, width=32, height=32)))
                out = []
                while not out: out = sb.step()
            print(b, t, mode, "ok", out[0][1].images[0].size)
        except Exception as e:
            print(b, t, mode, "FAIL", type(e).__name__, str(e)[:150])
