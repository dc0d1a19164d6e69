"""Triton kernel of :mod:`models.kernels.slot_attention` (a module of its own, imported on first use: Triton
decides at decoration time whether a kernel runs compiled or under its interpreter)."""

import triton
import triton.language as tl


@triton.jit
def _slot_fwd(Q, K, V, OUT, SLOTS, MASK, POSI, BKT, POSW, TSW,
              sqb, sqs, sqh, skr, skh, skt, svr, svh, svt, sob, sos, soh,
              sslot, smb, sms, smt, spb, sps, spt, sbb, sbs, sbt,
              S, T, H, inv_norm,
              DQ: tl.constexpr, DV: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    slot = tl.load(SLOTS + b * sslot).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    dq = tl.arange(0, BDQ)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h * sqh + offs_s[:, None] * sqs + dq[None, :],
                mask=(offs_s[:, None] < S) & (dq[None, :] < DQ), other=0.0)
    acc = tl.zeros((BLOCK_S, BDV), dtype=tl.float32)
    k_base = K + slot * skr + h * skh
    v_base = V + slot * svr + h * svh
    for start_t in range(0, T, BLOCK_T):
        offs_t = start_t + tl.arange(0, BLOCK_T)
        inb = (offs_s[:, None] < S) & (offs_t[None, :] < T)
        k = tl.load(k_base + offs_t[:, None] * skt + dq[None, :],
                    mask=(offs_t[:, None] < T) & (dq[None, :] < DQ), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        keep = (tl.load(MASK + b * smb + offs_s[:, None] * sms + offs_t[None, :] * smt, mask=inb, other=0) != 0) & inb
        # the bias only where a key counts: a masked key's indices may point past the tables
        pos = tl.load(POSI + b * spb + offs_s[:, None] * sps + offs_t[None, :] * spt, mask=keep, other=0)
        bucket = tl.load(BKT + b * sbb + offs_s[:, None] * sbs + offs_t[None, :] * sbt, mask=keep, other=0)
        s += tl.load(POSW + pos, mask=keep, other=0.0).to(tl.float32)
        s += tl.load(TSW + bucket, mask=keep, other=0.0).to(tl.float32)
        w = tl.where(keep, s * tl.sigmoid(s) * inv_norm, 0.0)
        v = tl.load(v_base + offs_t[:, None] * svt + dv[None, :],
                    mask=(offs_t[:, None] < T) & (dv[None, :] < DV), other=0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PREC)
    tl.store(OUT + b * sob + h * soh + offs_s[:, None] * sos + dv[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_s[:, None] < S) & (dv[None, :] < DV))
