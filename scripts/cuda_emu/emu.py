"""Host emulation of the layout/bit logic of csrc/cuda/moe*.cu (no GPU here). Mirrors the kernels'
formulas line by line; checks them against numpy/torch references."""
import numpy as np, torch, random, itertools, sys
sys.path.insert(0, '/work/wt-moe-cuda')
from gptoss_ext import reference as ref
rng = np.random.default_rng(0)
M32 = 0xFFFFFFFF

def prmt(a, b, sel):
    src = [(a >> (8*i)) & 0xFF for i in range(4)] + [(b >> (8*i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4*i)) & 0xF
        byte = src[s & 7]
        if s & 8: byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8*i)
    return out

HI0, HI1, LO0, LO1 = 0x40403F00, 0x41414040, 0x40008000, 0x4000C080
def decode8_twice_bf16(w):
    wh = w >> 16
    sel_lo, sel_hi = w & 0x7777, wh & 0x7777
    h_lo, l_lo = prmt(HI0, HI1, sel_lo), prmt(LO0, LO1, sel_lo)
    h_hi, l_hi = prmt(HI0, HI1, sel_hi), prmt(LO0, LO1, sel_hi)
    sg_lo, sg_hi = prmt(0x80808080, 0x80808080, w), prmt(0x80808080, 0x80808080, wh)
    h_lo |= ((sg_lo << 7) & M32) & 0x80808080
    h_hi |= ((sg_hi << 7) & M32) & 0x80808080
    return [prmt(l_lo, h_lo, 0x5140), prmt(l_lo, h_lo, 0x7362), prmt(l_hi, h_hi, 0x5140), prmt(l_hi, h_hi, 0x7362)]

def bf16_bits_to_f(b):
    return np.array([b << 16], dtype=np.uint32).view(np.float32)[0]
def f_to_bf16_bits_exact(f):
    u = int(np.array([f], dtype=np.float32).view(np.uint32)[0])
    assert u & 0xFFFF == 0, f
    return u >> 16

def bf16_half_scale(s): return ((s - 1) << 7) if s >= 2 else (0x20 << s)
def bf16x2_mul(x, y):  # exact products (checked), RNE not needed
    out = 0
    for h in range(2):
        a = bf16_bits_to_f((x >> (16*h)) & 0xFFFF); b = bf16_bits_to_f((y >> (16*h)) & 0xFFFF)
        p = np.float32(np.float64(a) * np.float64(b))  # exact product of 2-bit-significand values
        if not np.isfinite(p): out |= ((0x7F80 | (0x8000 if np.signbit(p) else 0)) << (16*h)); continue
        u = int(np.array([p], dtype=np.float32).view(np.uint32)[0])
        assert u & 0xFFFF == 0 or abs(p) < 2**-126, (a, b, p)
        out |= (u >> 16) << (16*h)
    return out

FP4 = ref.FP4_VALUES
# 1) decode8: every nibble in every position, plus random words
def check_decode_word(w):
    out = decode8_twice_bf16(w)
    for j in range(4):
        for h in range(2):
            e = 2*j + h
            nib = (w >> (4*e)) & 0xF
            got = bf16_bits_to_f((out[j] >> (16*h)) & 0xFFFF)
            exp = 2 * FP4[nib]
            assert got == exp and np.signbit(got) == np.signbit(exp), (hex(w), e, nib, got, exp)
for pos in range(8):
    for nib in range(16):
        for _ in range(20):
            w = int(rng.integers(0, 2**32)); w = (w & ~(0xF << (4*pos))) | (nib << (4*pos))
            check_decode_word(w)
for _ in range(20000): check_decode_word(int(rng.integers(0, 2**32)))
print("decode8_twice_bf16: ok")

# 2) decode8_bf16 with scale: values vs reference for all scales 2..254 (exact zone)
for s in range(0, 256):
    w = int(rng.integers(0, 2**32))
    out = [bf16x2_mul(o, bf16_half_scale(s) * 0x00010001) for o in decode8_twice_bf16(w)]
    blocks = torch.tensor([[(w >> (8*i)) & 0xFF for i in range(4)] + [0]*12], dtype=torch.uint8)
    refv = ref.mxfp4_dequantize(blocks, torch.tensor([s], dtype=torch.uint8), torch.bfloat16).float()[:8]
    for e in range(8):
        got = bf16_bits_to_f((out[e // 2] >> (16 * (e % 2))) & 0xFFFF)
        r = refv[e].item()
        if s >= 2:
            assert (got == r or (np.isinf(got) and np.isinf(r) and np.sign(got) == np.sign(r))), (s, e, got, r)
print("decode8_bf16 (scaled): exact vs reference for scale bytes 2..255")

# 3) mxfp4_float_bits vs reference float32 dequant, every nibble and scale
def mxfp4_float_bits(nib, s):
    sign = (nib & 8) << 28; mag = nib & 7
    if mag == 0: return sign
    e2 = 0 if mag == 1 else mag >> 1; m = 0 if mag == 1 else mag & 1
    x = e2 + s - 128
    if x > 127: return sign | 0x7F800000
    if x >= -126: return sign | ((x + 127) << 23) | (m << 22)
    return sign | ((2 + m) << (x + 148))
blocks = torch.tensor([[n | (n << 4) for n in range(16)]], dtype=torch.uint8).repeat(256, 1).view(256, 1, 16)
scales = torch.arange(256, dtype=torch.uint8).view(256, 1)
r32 = ref.mxfp4_dequantize(blocks, scales, torch.float32).view(torch.int32).numpy().astype(np.int64) & M32
for s in range(256):
    for n in range(16):
        got = mxfp4_float_bits(n, s)
        assert got == r32[s, 2*n] == r32[s, 2*n+1], (s, n, hex(got), hex(r32[s, 2*n]))
print("mxfp4_float_bits: bit-exact vs reference float32 for all 16 x 256")

# 4) TC kernel tile emulation (one CTA tile) for dense B and MXFP4 B
def tc_swz(r, kc): return r*64 + ((kc ^ ((r >> 1) & 3)) << 4)
def ldmatrix_x4(smem16, addrs):  # addrs[lane] = byte address; returns regs[lane][4] as (lo, hi) pairs of b16
    regs = [[None]*4 for _ in range(32)]
    for i in range(4):
        rows = [smem16[addrs[8*i + j] // 2: addrs[8*i + j] // 2 + 8] for j in range(8)]
        for l in range(32):
            g, t = l >> 2, l & 3
            regs[l][i] = (rows[g][2*t], rows[g][2*t+1])
    return regs
def mma(acc, a, b):  # acc[lane][4] floats, a[lane][4] pairs, b[lane][2] pairs
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        A[g, 2*t:2*t+2] = a[l][0]; A[g+8, 2*t:2*t+2] = a[l][1]; A[g, 2*t+8:2*t+10] = a[l][2]; A[g+8, 2*t+8:2*t+10] = a[l][3]
        B[2*t:2*t+2, g] = b[l][0]; B[2*t+8:2*t+10, g] = b[l][1]
    D = A @ B
    for l in range(32):
        g, t = l >> 2, l & 3
        acc[l][0] += D[g, 2*t]; acc[l][1] += D[g, 2*t+1]; acc[l][2] += D[g+8, 2*t]; acc[l][3] += D[g+8, 2*t+1]

def emulate_tc_tile(X, W, rows, m0, Mtot, K, bsrc, Wmx=None):
    """X: [rows, K] gathered rows (float values, bf16-exact), W: [Mtot, K]. Returns out tile [128, 128] (nan = unwritten)."""
    KT = (K + 31) // 32
    acc = {(w, l): np.zeros((4, 4, 4)) for w in range(8) for l in range(32)}
    for kt in range(KT):
        sA = np.zeros(128*32); sB = np.zeros(128*32)
        for tid in range(256):
            kc = tid & 3; k = kt*32 + kc*8
            for i in range(2):
                r = (tid >> 2) + 64*i
                if r < rows and k < K:
                    sA[tc_swz(r, kc)//2: tc_swz(r, kc)//2 + 8] = X[r, k:k+8]
                if bsrc == 'dense':
                    n = m0 + r
                    if n < Mtot and k < K:
                        sB[tc_swz(r, kc)//2: tc_swz(r, kc)//2 + 8] = W[n, k:k+8]
            if bsrc == 'mxfp4':
                blocks, scales = Wmx
                n = m0 + (tid >> 1); h = tid & 1
                if n < Mtot:
                    raw = blocks[n, kt, 8*h:8*h+8]; sc = int(scales[n, kt])
                else:
                    raw = np.zeros(8, np.uint8); sc = 127
                words = [int(raw[0]) | int(raw[1]) << 8 | int(raw[2]) << 16 | int(raw[3]) << 24,
                         int(raw[4]) | int(raw[5]) << 8 | int(raw[6]) << 16 | int(raw[7]) << 24]
                s2 = bf16_half_scale(sc) * 0x00010001
                for wi, word in enumerate(words):
                    regs = [bf16x2_mul(o, s2) for o in decode8_twice_bf16(word)]
                    vals = []
                    for rg in regs: vals += [bf16_bits_to_f(rg & 0xFFFF), bf16_bits_to_f(rg >> 16)]
                    r = tid >> 1
                    base = tc_swz(r, 2*h + wi) // 2
                    sB[base: base + 8] = vals
        for warp in range(8):
            warp_m, warp_n = warp >> 2, warp & 3
            for ks in range(2):
                af = [ldmatrix_x4(sA, [tc_swz(warp_m*64 + mi*16 + (l & 15), 2*ks + (l >> 4)) for l in range(32)]) for mi in range(4)]
                bfr = [[None]*4 for _ in range(32)]
                for nj in range(2):
                    r4 = ldmatrix_x4(sB, [tc_swz(warp_n*32 + nj*16 + ((l >> 4) << 3) + (l & 7), 2*ks + ((l >> 3) & 1)) for l in range(32)])
                    for l in range(32):
                        bfr[l][2*nj] = (r4[l][0], r4[l][1]); bfr[l][2*nj+1] = (r4[l][2], r4[l][3])
                for mi in range(4):
                    for ni in range(4):
                        a = [af[mi][l] for l in range(32)]; b = [bfr[l][ni] for l in range(32)]
                        tmp = [acc[(warp, l)][mi][ni] for l in range(32)]
                        mma(tmp, a, b)
    out = np.full((128, 128), np.nan)
    for warp in range(8):
        warp_m, warp_n = warp >> 2, warp & 3
        for l in range(32):
            g, t4 = l >> 2, l & 3
            for mi in range(4):
                for h in range(2):
                    r = warp_m*64 + mi*16 + g + 8*h
                    if r >= rows: continue
                    for ni in range(4):
                        n = warp_n*32 + ni*8 + 2*t4
                        if m0 + n >= Mtot: continue
                        assert np.isnan(out[r, n]) and np.isnan(out[r, n+1])
                        out[r, n] = acc[(warp, l)][mi][ni][2*h]; out[r, n+1] = acc[(warp, l)][mi][ni][2*h+1]
    return out

def bf16r(a): return torch.tensor(a, dtype=torch.float32).bfloat16().float().numpy().astype(np.float64)
for (rows, Mtot, m0, K) in [(128, 256, 128, 64), (37, 200, 128, 40), (5, 90, 0, 96)]:
    X = bf16r(rng.standard_normal((rows, K))); W = bf16r(rng.standard_normal((Mtot, K)))
    out = emulate_tc_tile(X, W, rows, m0, Mtot, K, 'dense')
    expv = X @ W[m0:m0+128].T
    cols = min(128, Mtot - m0)
    assert np.allclose(out[:rows, :cols], expv[:, :cols], atol=1e-9), np.abs(out[:rows, :cols] - expv).max()
    assert np.isnan(out[rows:]).all() and np.isnan(out[:, cols:]).all()
print("TC tile (dense B): ok")
for (rows, Mtot, m0, K) in [(128, 256, 128, 64), (19, 150, 128, 96)]:
    X = bf16r(rng.standard_normal((rows, K)))
    KB = K // 32
    blocks = rng.integers(0, 256, (Mtot, KB, 16), dtype=np.uint8); scales = rng.integers(118, 130, (Mtot, KB), dtype=np.uint8)
    Wd = ref.mxfp4_dequantize(torch.from_numpy(blocks), torch.from_numpy(scales), torch.float64).numpy()
    out = emulate_tc_tile(X, None, rows, m0, Mtot, K, 'mxfp4', (blocks, scales))
    expv = X @ Wd[m0:m0+128].T
    cols = min(128, Mtot - m0)
    assert np.allclose(out[:rows, :cols], expv[:, :cols], atol=1e-9), np.abs(out[:rows, :cols] - expv[:, :cols]).max()
print("TC tile (MXFP4 B): ok")

# 5) GEMV warp emulation: staging swizzle, lane loads, mma mapping, epilogue
def emulate_gemv(Xtok, blocks, scales, K, NT, kc, rs, m_base, Mtot):
    """Xtok [TOK, K] (TOK = 8NT token rows, bf16 values), one warp owning rows m_base + 0..15. Returns out [TOK, 16]."""
    TOK = 8*NT; KB = K // 32
    acc = {(l, n): np.zeros(4) for l in range(32) for n in range(NT)}
    for kc0 in range(0, K, kc):
        xs = np.zeros(TOK * rs // 2)
        cpr = kc // 8
        for q in range(TOK * cpr):
            tok, c = q // cpr, q % cpr
            blk, wq = c >> 2, c & 3
            k = kc0 + 8*c
            v = Xtok[tok, k:k+8] if k < K else np.zeros(8)
            off = (tok*rs + (blk*4 + (wq ^ ((blk >> 1) & 1)))*16) // 2
            xs[off:off+8] = v
        steps = (min(kc, K - kc0) + 127) // 128
        for s in range(steps):
            A_regs = {}; B_regs = {}
            for l in range(32):
                g, t4 = l >> 2, l & 3
                kbi = kc0 // 32 + t4 + 4*s
                rowsw = []
                for mrow in (m_base + 2*g, m_base + 2*g + 1):
                    if kbi < KB and mrow < Mtot:
                        raw = blocks[mrow, kbi]; sc = int(scales[mrow, kbi])
                    else:
                        raw = np.zeros(16, np.uint8); sc = 127
                    s2 = bf16_half_scale(sc) * 0x00010001
                    words = [int(raw[4*i]) | int(raw[4*i+1]) << 8 | int(raw[4*i+2]) << 16 | int(raw[4*i+3]) << 24 for i in range(4)]
                    rowsw.append([[bf16x2_mul(o, s2) for o in decode8_twice_bf16(wd)] for wd in words])
                A_regs[l] = rowsw
                blk = 4*s + t4; sw = (blk >> 1) & 1
                for n in range(NT):
                    row = ((n*8 + g)*rs + blk*64)
                    for q in range(4):
                        off = (row + ((q ^ sw) << 4)) // 2
                        B_regs[(l, n, q)] = xs[off:off+8]
            def pair(reg): return (bf16_bits_to_f(reg & 0xFFFF), bf16_bits_to_f(reg >> 16))
            for n in range(NT):
                for q in range(4):
                    for r in range(2):
                        a = []; b = []
                        for l in range(32):
                            wa, wb = A_regs[l][0][q], A_regs[l][1][q]
                            a.append([pair(wa[2*r]), pair(wb[2*r]), pair(wa[2*r+1]), pair(wb[2*r+1])])
                            xv = B_regs[(l, n, q)]
                            b.append([(xv[4*r], xv[4*r+1]), (xv[4*r+2], xv[4*r+3])])
                        tmp = [acc[(l, n)] for l in range(32)]
                        mma(tmp, a, b)
    out = np.full((TOK, 16), np.nan)
    for l in range(32):
        g, t4 = l >> 2, l & 3
        for n in range(NT):
            for cc in range(2):
                tok = 8*n + 2*t4 + cc
                out[tok, 2*g] = acc[(l, n)][cc]; out[tok, 2*g+1] = acc[(l, n)][2 + cc]
    return out
for (K, NT, kc, Mtot, m_base) in [(96, 1, 128, 16, 0), (320, 2, 128, 40, 16), (288, 1, 256, 30, 16)]:
    TOK = 8*NT; KB = K // 32
    Xtok = bf16r(rng.standard_normal((TOK, K)))
    blocks = rng.integers(0, 256, (Mtot, KB, 16), dtype=np.uint8); scales = rng.integers(118, 130, (Mtot, KB), dtype=np.uint8)
    Wd = ref.mxfp4_dequantize(torch.from_numpy(blocks), torch.from_numpy(scales), torch.float64).numpy()
    rs = kc*2 + 32
    out = emulate_gemv(Xtok, blocks, scales, K, NT, kc, rs, m_base, Mtot)
    nrow = min(16, Mtot - m_base)
    expv = Xtok @ Wd[m_base:m_base+nrow].T
    assert np.allclose(out[:, :nrow], expv, atol=1e-9), np.abs(out[:, :nrow] - expv).max()
    assert (rs // 16) % 8 == 2
print("GEMV warp (MXFP4, permuted k): ok")

# 5b) bank conflicts of the GEMV x reads (per quarter warp, 16-byte accesses)
for rsk in [128*23, 128*11, 2944]:
    rs = rsk*2 + 32
    for s in range(3):
        for q in range(4):
            for quarter in range(4):
                groups = set()
                for l in range(8*quarter, 8*quarter + 8):
                    g, t4 = l >> 2, l & 3
                    blk = 4*s + t4
                    addr = g*rs + blk*64 + ((q ^ ((blk >> 1) & 1)) << 4)
                    groups.add((addr // 16) % 8)
                assert len(groups) == 8, (rsk, s, q, quarter, groups)
print("GEMV x reads: conflict-free")
# ldmatrix bank check: 8 row addresses of one matrix hit 8 distinct 16B bank groups
for kc in range(4):
    for r0 in range(0, 128, 8):
        assert len({(tc_swz(r0 + j, kc) // 16) % 8 for j in range(8)}) == 8
print("TC ldmatrix reads: conflict-free")

# 6) counting sort emulation (warp-level match_any + ranks), stability, invalid keys
def counting_sort(keys, bins):
    n = len(keys)
    max_chunks = max(1, (1 << 20) // (bins + 1))
    chunk = max(256, -(-(-(-n // max_chunks)) // 32) * 32)
    nc = -(-n // chunk)
    counts = np.zeros((bins + 1) * nc, np.int64)
    binof = lambda k: k if 0 <= k < bins else bins
    for c in range(nc):
        start, end = c*chunk, min(n, (c+1)*chunk)
        for base in range(start, end, 32):
            lanes = [s for s in range(base, base+32) if s < end]
            by = {}
            for s in lanes: by.setdefault(binof(keys[s]), []).append(s)
            for b, ss in by.items(): counts[b*nc + c] += len(ss)
    # exclusive scan
    data = np.concatenate([[0], np.cumsum(counts)[:-1]])
    starts = np.array([data[b*nc] for b in range(bins + 1)])
    perm = np.full(n, -1)
    for c in range(nc):
        start, end = c*chunk, min(n, (c+1)*chunk)
        for base in range(start, end, 32):
            lanes = [s for s in range(base, base+32) if s < end]
            by = {}
            for s in lanes: by.setdefault(binof(keys[s]), []).append(s)
            for b, ss in by.items():
                for rank, s in enumerate(ss): perm[data[b*nc + c] + rank] = s
                data[b*nc + c] += len(ss)
    return perm, starts
for (n, bins, bad) in [(1000, 7, 0), (4096*4, 32, 0), (300, 128, 5), (5000, 3, 40), (70, 1, 0)]:
    keys = rng.integers(0, bins, n)
    if bad: keys[rng.choice(n, bad, replace=False)] = rng.choice([-3, bins, bins + 9], bad)
    perm, starts = counting_sort(list(keys), bins)
    sk = np.where((keys >= 0) & (keys < bins), keys, bins)
    expect = np.argsort(sk, kind='stable')
    assert (perm == expect).all()
    assert starts[bins] == (sk < bins).sum()
print("counting sort: stable, invalid keys last")
print("ALL OK")
