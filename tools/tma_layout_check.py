"""Offline check of the prefill producer's index math (no GPU): that TMA's SWIZZLE_128B / 64B,
as an XOR of smem address bits, puts page boxes exactly where KMajorTile::offset expects them
(block sizes 16..256); that the FP8 ldmatrix / stmatrix V transpose of the TMA layout (every
head_dim) writes the same V^T words as the LDS / STS transpose of the v_staging_offset layout
(every cache in a FIREATTN_PREFILL_TMA=0 build), with the bank conflicts of
both; and the page boxes a tile issues. (16-bit caches in the TMA layout transpose nothing: PV
reads the staging tile itself.) Mirrors csrc/prefill/prefill_kernel.cuh by hand: keep the two in step."""
import random
def ktile_offset(R, KB, row, byte):
    CW = min(KB, 128); mask = 0x70 if CW == 128 else 0x30
    off = (byte // CW) * (R * CW) + row * CW + (byte % CW)
    return off ^ ((off >> 3) & mask)
def ktile_offset_rowform(R, KB, row, byte):  # KMajorTile::offset as the kernel writes it
    CW = min(KB, 128); sw = (row & 7) << 4 if CW == 128 else (row & 6) << 3
    return (byte // CW) * (R * CW) + row * CW + ((byte % CW) ^ sw)
for R in (32, 64, 128, 256):
    for KB in (64, 128, 256, 512):
        assert all(ktile_offset(R, KB, r, b) == ktile_offset_rowform(R, KB, r, b)
                   for r in range(R) for b in range(0, KB, 4)), (R, KB)
print("KMajorTile::offset (row form) == the swizzle as an XOR of address bits, every tile shape")
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
# The ldmatrix / stmatrix transpose (head_dim 128/256, TMA layout): one warp-wide unit moves 16
# keys x 32 dims. ldmatrix.x4 matrix m (rows from lanes 8m..8m+7): keys LD_KEYS[m % 2][r] of the
# 16-key group, 16 dims (chunk m // 2); lane t receives row t // 4, bytes 4 (t % 4) .. +3. Byte
# pairs (a, b) of the V^T order (b16 element r = keys (a_r, a_r + 1), a = 0, 8, 2, 10, ...) come
# from matrices 0 / 1 (swapped on odd rows); X takes dims 4q + {0, 1} for q < 2 and 4q + {2, 3}
# for q >= 2, Y the others, so each stmatrix phase hits 8 distinct 16-byte bank groups.
# stmatrix.x4.trans writes fragment element (r, c) of matrix m to row c, b16 position r.
LD_KEYS = ([0, 9, 2, 11, 4, 13, 6, 15], [1, 8, 3, 10, 5, 12, 7, 14])
def x_dim(c, is_x):
    q, e = c // 2, c % 2
    lo = (q < 2) == is_x
    return 4 * q + (0 if lo else 2) + e
def lane_selectors(lane):
    r, q = lane // 4, lane % 4
    def sel(i, i2):  # element dims i, i2 of the lane's 4: bytes [a_i, b_i, a_i2, b_i2]
        a, b = (0, 4) if r % 2 == 0 else (4, 0)
        return (a + i) | (b + i) << 4 | (a + i2) << 8 | (b + i2) << 12
    x = sel(0, 1) if q < 2 else sel(2, 3)
    y = sel(2, 3) if q < 2 else sel(0, 1)
    return x, y
def run_matrix_transpose(D, N, staging):
    vt, worst = {}, 1
    groups = N // 16
    for unit in range(groups * (D // 32)):
        kg, dg = unit % groups, unit // groups
        ld_addr = [ktile_offset(N, D, kg * 16 + LD_KEYS[(ln // 8) % 2][ln % 8], (dg * 2 + ln // 16) * 16) for ln in range(32)]
        cw = min(D, 128)
        for ln in range(32):  # the kernel's hoisted form of the same offsets
            key = LD_KEYS[(ln // 8) % 2][ln % 8]
            ld_x = ((ln // 16) * 16) ^ (((key % 8) << 4) if cw == 128 else ((key & 6) << 3))
            assert ld_addr[ln] == (kg * 16 + key) * cw + (dg * 32 // cw) * (N * cw) + ((dg * 32 % cw) ^ ld_x)
        for m in range(4):
            g = [(a >> 4) & 7 for a in ld_addr[8 * m:8 * m + 8]]
            worst = max(worst, max(g.count(x) for x in g))
        regs = [[word(staging, ld_addr[8 * m + ln // 4] + 4 * (ln % 4)) for m in range(4)] for ln in range(32)]
        frag = []
        for ln in range(32):
            sx, sy = lane_selectors(ln)
            r0, r1, r2, r3 = regs[ln]
            frag.append([prmt(r0, r1, sx), prmt(r0, r1, sy), prmt(r2, r3, sx), prmt(r2, r3, sy)])
        st_addr = []
        for ln in range(32):
            m, c = ln // 8, ln % 8
            d = dg * 32 + (m // 2) * 16 + x_dim(c, m % 2 == 0)
            st_addr.append(ktile_offset(D, N, d, kg * 16))
            cw = min(N, 128); st_dim = d - dg * 32
            st_sw = ktile_offset(D, N, st_dim, 0) - st_dim * cw
            st_key = (kg * 16 // cw) * (D * cw) + ((kg * 16 % cw) ^ st_sw)  # 256-key tiles: 2 column chunks
            assert st_addr[-1] == st_dim * cw + dg * 32 * cw + st_key
        for m in range(4):
            g = [(a >> 4) & 7 for a in st_addr[8 * m:8 * m + 8]]
            worst = max(worst, max(g.count(x) for x in g))
        rows = {}
        for ln in range(32):  # element (r = ln // 4, c = 2 (ln % 4) + h) -> row c, b16 position r
            for m in range(4):
                for h in range(2):
                    rows.setdefault((m, 2 * (ln % 4) + h), {})[ln // 4] = (frag[ln][m] >> (16 * h)) & 0xffff
        for (m, c), elems in rows.items():
            base = st_addr[8 * m + c]
            data = b"".join(elems[r].to_bytes(2, "little") for r in range(8))
            for w4 in range(4):
                vt[base + 4 * w4] = int.from_bytes(data[4 * w4:4 * w4 + 4], "little")
    return vt, worst
def expected_vt_word(V, d, w):
    """The V^T word the P fragment needs: word w of dim d's row holds k-positions 4w..4w+3 =
    keys {2u, 2u+1, 2u+8, 2u+9} (+16 for the step's upper half) of 32-key step w // 8."""
    step, tt = w // 8, w % 8
    u = tt % 4
    kbase = step * 32 + (16 if tt >= 4 else 0) + 2 * u
    keys = (kbase, kbase + 1, kbase + 8, kbase + 9)
    return sum(V[k][d] << (8 * i) for i, k in enumerate(keys))
# (head_dim, keys per FP8 tile; head_dim 64 takes 256-key tiles for long queries)
for D, N in ((64, 128), (64, 256), (128, 128), (256, 64)):
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
    def run_lds_transpose():
        vt = {}
        banks = {}
        for tid in range(128):
            sel_lo, sel_hi = 0x5140, 0x7362
            for task in range(tid, kWords * (D // 16), 128):
                w, dg = task % kWords, task // kWords
                step, tt = w // 8, w % 8; u = tt % 4
                kbase = step * 32 + (16 if tt >= 4 else 0) + 2 * u
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
    vt_old, w_old = run_lds_transpose()
    for d in range(D):
        for w in range(kWords):
            assert vt_old[ktile_offset(VtR, VtKB, d, 4 * w)] == expected_vt_word(V, d, w), (D, N, d, w)
    print(f"D{D} N{N}: LDS transpose gives the P fragment's key order in V^T")
    print(f"D{D} N{N}: TMA layout == KMajorTile for bs 16..256; LDS transpose: worst LDS.128 quarter-warp conflict {w_old}-way")
    vt_lsm, w_lsm = run_matrix_transpose(D, N, tma)  # head_dim 64: 64-byte K rows, SWIZZLE_64B
    assert vt_lsm == vt_old, D
    print(f"D{D}: ldmatrix/stmatrix transpose writes the same V^T; worst 8-row phase conflict {w_lsm}-way")

# Page boxes of a tile (lanes of warp 0): cover [max(k0, kv_begin), min(k0 + N, kv_end)), stay inside
# one page and the tile, start 16-key aligned, and only name pages holding a visible key.

for N in (32, 64, 128, 256):
    tshift = {32: 5, 64: 6, 128: 7, 256: 8}[N]
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
