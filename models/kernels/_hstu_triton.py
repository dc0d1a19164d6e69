"""Triton kernels of the fused HSTU attention (see models.kernels.hstu_attention for the contract).

A module of its own, imported on first use: Triton decides at decoration time whether a kernel runs
compiled or under its interpreter (TRITON_INTERPRET=1), and kernels call each other through module globals.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(q, k, offs_m, offs_n, b, N, BIAS, sbb, sbm, sbn, POSW, TSW, THR, qt, T, stb, max_len, num_buckets,
            BIAS_MODE: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    inb = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    if BIAS_MODE == 1:
        s += tl.load(BIAS + b * sbb + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=inb, other=0.0).to(tl.float32)
    if BIAS_MODE == 2:
        rel = offs_m[:, None] - offs_n[None, :] + max_len - 1
        pmask = inb & (rel >= 0) & (rel < 2 * max_len - 1)
        s += tl.load(POSW + rel, mask=pmask, other=0.0).to(tl.float32)
        t = tl.load(T + b * stb + offs_n, mask=offs_n < N, other=0)
        dt = tl.abs(qt[:, None] - t[None, :])
        dt = tl.maximum(dt, 1)
        guess = tl.floor(tl.log(dt.to(tl.float32)) / 0.301).to(tl.int32)
        guess = tl.minimum(tl.maximum(guess, 0), num_buckets)
        lo = tl.load(THR + guess)
        hi = tl.load(THR + guess + 1)
        bucket = tl.where(dt >= hi, guess + 1, tl.where(dt < lo, guess - 1, guess))
        bucket = tl.minimum(tl.maximum(bucket, 0), num_buckets)
        s += tl.load(TSW + bucket, mask=inb, other=0.0).to(tl.float32)
    return s

@triton.jit
def _fwd(Q, K, V, OUT, BIAS, POSW, TSW, THR, T, QT, VALID,
         sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sbb, sbm, sbn, stb, svalb,
         N, H, inv_norm, max_len, num_buckets,
         DQ: tl.constexpr, DV: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr,
         BIAS_MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BDQ)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + dq[None, :],
                mask=(offs_m[:, None] < N) & (dq[None, :] < DQ), other=0.0)
    qt = tl.load(QT + b * stb + offs_m, mask=offs_m < N, other=0)
    acc = tl.zeros((BLOCK_M, BDV), dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + dq[None, :],
                    mask=(offs_n[:, None] < N) & (dq[None, :] < DQ), other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, N, BIAS, sbb, sbm, sbn, POSW, TSW, THR, qt, T, stb, max_len,
                    num_buckets, BIAS_MODE, PREC)
        valid = tl.load(VALID + b * svalb + offs_n, mask=offs_n < N, other=0) != 0
        mask = (offs_m[:, None] >= offs_n[None, :]) & valid[None, :] & (offs_n[None, :] < N)
        w = tl.where(mask, s * tl.sigmoid(s) * inv_norm, 0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + dv[None, :],
                    mask=(offs_n[:, None] < N) & (dv[None, :] < DV), other=0.0)
        acc += tl.dot(w.to(v.dtype), v, input_precision=PREC)
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + dv[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (dv[None, :] < DV))

@triton.jit
def _bwd_dkdv(Q, K, V, DO, DK, DV_, DBIAS, BIAS, POSW, TSW, THR, T, QT, VALID,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sbb, sbm, sbn, stb, svalb,
              N, H, inv_norm, max_len, num_buckets,
              DQ: tl.constexpr, DV: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr,
              BIAS_MODE: tl.constexpr, NEED_DBIAS: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dq = tl.arange(0, BDQ)
    dv = tl.arange(0, BDV)
    kmask = (offs_n[:, None] < N) & (dq[None, :] < DQ)
    vmask = (offs_n[:, None] < N) & (dv[None, :] < DV)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + dq[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + dv[None, :], mask=vmask, other=0.0)
    valid = tl.load(VALID + b * svalb + offs_n, mask=offs_n < N, other=0) != 0
    dk = tl.zeros((BLOCK_N, BDQ), dtype=tl.float32)
    dvacc = tl.zeros((BLOCK_N, BDV), dtype=tl.float32)
    lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + dq[None, :],
                    mask=(offs_m[:, None] < N) & (dq[None, :] < DQ), other=0.0)
        do = tl.load(DO + b * sob + h * soh + offs_m[:, None] * son + dv[None, :],
                     mask=(offs_m[:, None] < N) & (dv[None, :] < DV), other=0.0)
        qt = tl.load(QT + b * stb + offs_m, mask=offs_m < N, other=0)
        s = _scores(q, k, offs_m, offs_n, b, N, BIAS, sbb, sbm, sbn, POSW, TSW, THR, qt, T, stb, max_len,
                    num_buckets, BIAS_MODE, PREC)
        mask = (offs_m[:, None] >= offs_n[None, :]) & valid[None, :] & (offs_m[:, None] < N) & (offs_n[None, :] < N)
        sig = tl.sigmoid(s)
        w = tl.where(mask, s * sig * inv_norm, 0.0)
        dvacc += tl.dot(tl.trans(w).to(do.dtype), do, input_precision=PREC)
        dw = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = tl.where(mask, dw * inv_norm * sig * (1.0 + s * (1.0 - sig)), 0.0)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        if NEED_DBIAS:
            tl.atomic_add(DBIAS + b * N * N + offs_m[:, None] * N + offs_n[None, :], ds,
                          mask=(offs_m[:, None] < N) & (offs_n[None, :] < N))
    tl.store(DK + b * skb + h * skh + offs_n[:, None] * skn + dq[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV_ + b * svb + h * svh + offs_n[:, None] * svn + dv[None, :], dvacc.to(DV_.dtype.element_ty),
             mask=vmask)

@triton.jit
def _bwd_dq(Q, K, V, DO, DQ_, BIAS, POSW, TSW, THR, T, QT, VALID,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sbb, sbm, sbn, stb, svalb,
            N, H, inv_norm, max_len, num_buckets,
            DQ: tl.constexpr, DV: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr,
            BIAS_MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BDQ)
    dv = tl.arange(0, BDV)
    qmask = (offs_m[:, None] < N) & (dq[None, :] < DQ)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + dq[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sob + h * soh + offs_m[:, None] * son + dv[None, :],
                 mask=(offs_m[:, None] < N) & (dv[None, :] < DV), other=0.0)
    qt = tl.load(QT + b * stb + offs_m, mask=offs_m < N, other=0)
    acc = tl.zeros((BLOCK_M, BDQ), dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, N)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + dq[None, :],
                    mask=(offs_n[:, None] < N) & (dq[None, :] < DQ), other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + dv[None, :],
                    mask=(offs_n[:, None] < N) & (dv[None, :] < DV), other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, N, BIAS, sbb, sbm, sbn, POSW, TSW, THR, qt, T, stb, max_len,
                    num_buckets, BIAS_MODE, PREC)
        valid = tl.load(VALID + b * svalb + offs_n, mask=offs_n < N, other=0) != 0
        mask = (offs_m[:, None] >= offs_n[None, :]) & valid[None, :] & (offs_n[None, :] < N)
        sig = tl.sigmoid(s)
        dw = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = tl.where(mask, dw * inv_norm * sig * (1.0 + s * (1.0 - sig)), 0.0)
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ_ + b * sqb + h * sqh + offs_m[:, None] * sqn + dq[None, :], acc.to(DQ_.dtype.element_ty),
             mask=qmask)
