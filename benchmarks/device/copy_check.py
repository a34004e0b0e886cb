"""The permuted K/V copy on the GPU: Triton row gather (``permuted_copy``) vs the index_select it replaced.
python3 benchmarks/device/copy_check.py -> a line per shape: ms for K and V together, and equality."""
import torch
import triton

from pbs_kernels.triton import attention as A

for name, h_kv, d in (("smollm2", 3, 64), ("llama", 8, 128)):
    for n in (32768, 131072):
        k = torch.randn(1, n, h_kv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # transformers' layout
        v = torch.randn_like(k)
        perm = torch.stack([torch.randperm(n, device="cuda") for _ in range(h_kv)])[None].to(torch.int32)

        def old(x):  # the previous implementation: contiguous copy, int64 row index, index_select
            x = x.contiguous()
            base = (torch.arange(h_kv, device="cuda") * n)[None, :, None]
            return x.reshape(-1, d).index_select(0, (base + perm.long()).reshape(-1)).reshape(1, h_kv, n, d)

        same = torch.equal(A.permuted_copy(k, perm), old(k))
        t_new = triton.testing.do_bench(lambda: (A.permuted_copy(k, perm), A.permuted_copy(v, perm)))
        t_old = triton.testing.do_bench(lambda: (old(k), old(v)))
        mb = 2 * k.numel() * 2 / 2**20
        print(f"{name} N={n}: K+V {mb:.0f} MiB, triton {t_new:.3f} ms, index_select {t_old:.3f} ms, equal {same}")
