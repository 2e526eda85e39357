"""Offline check of the FIREATTN_PREFILL_TMA=1 producer's index math (no GPU): that TMA's
SWIZZLE_128B / 64B, as an XOR of smem address bits, puts page boxes exactly where KMajorTile::offset
expects them (block sizes 16..256), that the TMA-layout V transpose (row pairs swapped on lanes
with tt >= 4, prmt selectors 0x1504 / 0x3726) writes the same V^T words as the v_staging_offset
transpose, and the LDS.128 bank conflicts of both (per quarter-warp). Mirrors
csrc/prefill/prefill_kernel.cuh by hand: keep the two in step."""
# Simulates the TMA staging layout, the TMA-path transpose and the old transpose; checks equality
# of the V^T tile and bank conflicts of the transpose's LDS.128 (per quarter-warp).
import random
def ktile_offset(R, KB, row, byte):
    CW = min(KB, 128); mask = 0x70 if CW == 128 else 0x30
    off = (byte // CW) * (R * CW) + row * CW + (byte % CW)
    return off ^ ((off >> 3) & mask)
def tma_swz(addr, CW):  # TMA SWIZZLE_128B / 64B on (1024-aligned-base-relative) smem address
    if CW == 128: return addr ^ (((addr >> 7) & 7) << 4)
    return addr ^ (((addr >> 7) & 3) << 4)
def v_staging_offset(D, row, chunk):
    rb = D
    sw = ((row >> 1) & 3) | ((row >> 2) & 4) if rb >= 128 else (row >> 1) & 3
    return row * rb + ((chunk ^ sw) << 4)
def prmt(a, b, sel):
    bs = [(a >> (8*i)) & 0xff for i in range(4)] + [(b >> (8*i)) & 0xff for i in range(4)]
    r = 0
    for i in range(4): r |= bs[(sel >> (4*i)) & 7] << (8*i)
    return r
def word(buf, off): return int.from_bytes(bytes(buf[off:off+4]), 'little')
for D in (64, 128, 256):
    N = 64 if D == 256 else 128
    CW = min(D, 128)
    V = [[random.randrange(256) for _ in range(D)] for _ in range(N)]
    for bs in (16, 32, 64, 128, 256):
        box = min(bs, N)
        # TMA: boxes of `box` rows x CW bytes per column chunk, at dst = c*N*CW + key*CW
        tma = [None] * (N * D)
        for k0 in range(0, N, box):
            for c in range(D // CW):
                dst = c * N * CW + k0 * CW
                assert dst % 1024 == 0
                for r in range(box):
                    for b in range(CW):
                        tma[tma_swz(dst + r * CW + b, CW)] = V[k0 + r][c * CW + b]
        for r in range(N):
            for b in range(D):
                assert tma[ktile_offset(N, D, r, b)] == V[r][b], (D, bs, r, b)
    old = [0] * (N * D)
    for r in range(N):
        for ch in range(D // 16):
            o = v_staging_offset(D, r, ch)
            old[o:o+16] = V[r][16*ch:16*ch+16]
    kWords = N // 4
    VtR, VtKB = D, N
    def run(path):
        vt = {}
        banks = {}
        for tid in range(128):
            swap = (tid >> 2) & 1
            sel_lo, sel_hi = (0x1504, 0x3726) if (path == 'tma' and swap) else (0x5140, 0x7362)
            for task in range(tid, kWords * (D // 16), 128):
                w, dg = task % kWords, task // kWords
                step, tt = w // 8, w % 8; u = tt % 4
                kbase = step * 32 + (16 if tt >= 4 else 0) + 2 * u
                if path == 'tma':
                    s = swap
                    rows = [kbase + s, kbase + 1 - s, kbase + 8 + s, kbase + 9 - s]
                    offs = [ktile_offset(N, D, r, dg * 16) for r in rows]; src = tma
                else:
                    rows = [kbase, kbase + 1, kbase + 8, kbase + 9]
                    offs = [v_staging_offset(D, r, dg) for r in rows]; src = old
                it = (task - tid) // 128
                for li, o in enumerate(offs):
                    banks.setdefault((it, tid // 32, li, (tid % 32) // 8), []).append((o >> 4) & 7)
                xs = [[word(src, o + 4*j) for j in range(4)] for o in offs]
                for j in range(4):
                    t0 = prmt(xs[0][j], xs[1][j], sel_lo); t1 = prmt(xs[0][j], xs[1][j], sel_hi)
                    t2 = prmt(xs[2][j], xs[3][j], sel_lo); t3 = prmt(xs[2][j], xs[3][j], sel_hi)
                    d = dg * 16 + 4 * j
                    for dd, val in ((0, prmt(t0, t2, 0x5410)), (1, prmt(t0, t2, 0x7632)), (2, prmt(t1, t3, 0x5410)), (3, prmt(t1, t3, 0x7632))):
                        vt[ktile_offset(VtR, VtKB, d + dd, 4 * w)] = val
        worst = max(max(g.count(x) for x in set(g)) for g in banks.values())
        return vt, worst
    vt_old, w_old = run('old'); vt_new, w_new = run('tma')
    assert vt_old == vt_new, D
    print(f"D{D}: V^T identical; worst LDS.128 quarter-warp conflict: old {w_old}-way, tma {w_new}-way; TMA layout == KMajorTile for bs 16..256")

# Page boxes of a tile (lanes of warp 0): cover [max(k0, kv_begin), min(k0 + N, kv_end)), stay inside
# one page and the tile, start 16-key aligned, and only name pages holding a visible key.

for N in (64, 128):
    tshift = 7 if N == 128 else 6
    for bs in (16, 32, 64, 128, 256, 512):
        bshift = bs.bit_length() - 1
        for _ in range(3000):
            kv_end = random.randrange(1, 5000); kv_begin = random.randrange(0, kv_end)
            tile0 = kv_begin // N * N
            ntiles = (kv_end - tile0 + N - 1) // N
            for t in range(ntiles):
                k0 = tile0 + t * N
                box_shift = min(bshift, tshift)
                lo, hi = max(k0, kv_begin), min(k0 + N, kv_end)
                assert lo < hi
                first = lo >> box_shift; n = ((hi - 1) >> box_shift) - first + 1
                assert 1 <= n <= N // 16
                covered = set()
                for lane in range(n):
                    tok = (first + lane) << box_shift
                    page = tok >> bshift; row = tok & (bs - 1)
                    assert page * bs <= tok and tok + (1 << box_shift) <= (page + 1) * bs  # box inside page
                    assert k0 <= tok and tok + (1 << box_shift) <= k0 + N  # inside tile
                    assert (tok - k0) % 16 == 0
                    # page has a valid key (block-table entry the old path reads too)
                    assert any(kv_begin <= k < kv_end for k in range(page * bs, (page + 1) * bs))
                    covered |= set(range(tok, tok + (1 << box_shift)))
                assert set(range(lo, hi)) <= covered
print("box cover ok")
