# PESC on Qwen2.5-0.5B (Llama family with q/k/v biases), instruction-tuned on Stanford Alpaca, on one GPU.
#   python train.py config/qwen2.5_pesc.py
# Downloads once into ~/.cache/pesc: config.json, tokenizer.json (byte-level BPE, NFC-normalised, digits
# split one by one), model.safetensors (988 MB, bf16), and alpaca_data.json.
#
# Worked out from the parameter counts (python compare.py --sizes):
#   dense 494.0M (d 896, 24 layers, 14 heads / 2 kv heads, SwiGLU 4864, vocab 151936, tied head).
#   PESC E=8, r=64 + LoRA r=8 on q,k,v,o: total 517.3M, trainable 23.27M (adapters 22.02M + routers 0.17M
#   + LoRA 1.08M), active per token 500.8M.
#   Memory: fp32 weights 2.1 GB (load_dtype="bfloat16" halves it, adapters then train in bf16 as in the
#   official code) + 0.27 GB for the trainable part; bf16 activations ~1.0 MB per token -> 8 x 512 tokens
#   at most ~4.1 GB, plus ~5 GB of fp32 logits and their gradient over the 151936-token vocabulary:
#   ~12 GB at most; grad_checkpointing=True cuts the activations to ~0.3 GB.
#   Time: ~2.2 GFLOP per tuned token (4 x 501M + 2 x 23M + attention); one Alpaca epoch (~10M tokens)
#   ~22 PFLOP: about 4 minutes at 100 TFLOP/s. Estimates, not measurements.
out_dir = "out-qwen2.5-pesc"
init_from = "Qwen/Qwen2.5-0.5B"
dataset = "alpaca"
block_size = 512
method = "pesc"
n_experts = 8
top_k = 2
adapter_dim = 64
lora_rank = 8
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 1600            # ~1 epoch of Alpaca
learning_rate = 2e-4
warmup_frac = 0.03
eval_interval = 200
n_val = 200
eval_max_new_tokens = 64
