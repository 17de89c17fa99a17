"""One training step of a small decoder with posenc's attention against the same model with plain PyTorch
attention, at growing sequence lengths (issue: training with posenc).

The model is the length-generalisation study's (examples/length_generalisation/study.py): 2 layers,
d_model 64, 4 heads of 16, RoPE, causal. "posenc" runs `posenc.torch.attention` (blockwise forward and
FlashAttention-2 backward in C++, memory linear in the length); "torch" runs the same formula as PyTorch
operations (RoPE by rotate_half, `softmax(q k^T / sqrt(d) + causal mask) v`, the [tokens, tokens] score
matrix materialised; Debian's torch 1.13 has no scaled_dot_product_attention). Both use the same weights,
threads and batch; a step is forward, cross-entropy, backward and an Adam update. Prints the median step
time of each and their ratio, measured in one run.

    PYTHONPATH=build/dev/python python3 bench/training_step.py [--lengths 1024,4096] [--batch 1] [--steps 5]
                                                               [--threads 1]
"""

import argparse
import math
import statistics
import time

import torch

import posenc
import posenc.torch as pt


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def torch_attention(q, k, v, cos, sin):
    """[b, t, h, d] in and out; RoPE (half-split pairs) and causal softmax attention as PyTorch operations."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, t, d]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


class Block(torch.nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.h, self.d = heads, d_model // heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model, bias=False)
        self.o = torch.nn.Linear(d_model, d_model, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))
        self.norm1, self.norm2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)

    def forward(self, x, attend):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.h, self.d).unbind(2)  # [b, t, h, d] views
        x = x + self.o(attend(q, k, v).flatten(2))
        return x + self.mlp(self.norm2(x))


class Model(torch.nn.Module):
    def __init__(self, vocab=64, d_model=64, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab)
        self.head_dim = d_model // heads

    def forward(self, tokens, attend):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.norm(x))


def step_times(model, tokens, attend, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, tables)
        start = time.perf_counter()
        logits = model(tokens[:, :-1], attend)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096", help="sequence lengths, comma separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point (median)")
    ap.add_argument("--threads", type=int, default=1, help="threads of torch and of posenc's attention alike")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rope = posenc.Rope(head_dim=16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; posenc {posenc.__version__}, "
          f"kernels {posenc.simd_level()}")
    print("| tokens | posenc step (s) | torch step (s) | posenc / torch |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        tokens = torch.randint(64, (args.batch, n + 1))
        ref = Model()
        model_p, model_t = Model(), Model()
        model_p.load_state_dict(ref.state_dict())
        model_t.load_state_dict(ref.state_dict())
        inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        angle = torch.outer(torch.arange(n, dtype=torch.float64), inv)
        cos, sin = (f(torch.cat([angle, angle], -1)).float() for f in (torch.cos, torch.sin))
        t_p, loss_p = step_times(model_p, tokens, lambda q, k, v: pt.attention(q, k, v, encoding=rope, causal=True,
                                                                                  threads=args.threads),
                                 args.steps)
        t_t, loss_t = step_times(model_t, tokens, lambda q, k, v: torch_attention(q, k, v, cos, sin), args.steps)
        assert abs(loss_p - loss_t) < 1e-2 * max(1.0, abs(loss_t)), (loss_p, loss_t)  # the same model and steps
        print(f"| {n} | {t_p:.3f} | {t_t:.3f} | {t_p / t_t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
