"""Offline check (exact rational arithmetic, no GPU) of the prefill's fast Q division (branch
exp/prefill-q-quant): clamp |x| to 1024 * s, y = RN(x * RN(1 / s)), then twice
y = RN(y + RN(x - s * y) * RN(1 / s)) (FMAs) must equal RN(x / s) in float32 for BF16 x and
positive normal scales s. Prints the mismatch counts after one and after two corrections."""
import math
import random
from fractions import Fraction as F


def rn32(q: F) -> F:
    """q rounded to the nearest float32 (ties to even), subnormals included, as a Fraction."""
    if q == 0:
        return F(0)
    sgn, a = (-1 if q < 0 else 1), abs(q)
    e = math.floor(math.log2(a.numerator) - math.log2(a.denominator))
    while F(2) ** e > a:
        e -= 1
    while F(2) ** (e + 1) <= a:
        e += 1
    ulp = F(2) ** (max(e, -126) - 23)
    m = a / ulp
    fl = m.numerator // m.denominator
    rem = m - fl
    if rem > F(1, 2) or (rem == F(1, 2) and fl % 2 == 1):
        fl += 1
    return sgn * fl * ulp


def fma(a: F, b: F, c: F) -> F:
    return rn32(a * b + c)


def q_div(x: F, s: F, steps: int) -> F:
    r, lim = rn32(1 / s), s * 1024
    x = min(max(x, -lim), lim)
    y = rn32(x * r)
    for _ in range(steps):
        y = fma(fma(-s, y, x), r, y)
    return y


def main() -> None:
    rng = random.Random(1)
    scales = [F(1), F(1, 2)] + [rn32(F(2) - F(2) ** -23) * F(2) ** k for k in (-6, -3, 0)]
    scales += [rn32(F(1) + F(j) * F(2) ** -23) for j in (1, 3, 7, 12345, 2 ** 22 + 1)]
    scales += [rn32(F(2 * rng.randint(1, 4000), 100 * 448)) for _ in range(30)]  # calibration-like
    scales += [rn32(F(rng.randint(2 ** 23, 2 ** 24 - 1), 2 ** 23) * F(2) ** rng.randint(-8, 3)) for _ in range(30)]
    xs = [sg * (1 + F(m, 128)) * F(2) ** e for m in range(128) for e in (-12, -9, -4, 0, 3, 9) for sg in (1, -1)]
    n = bad1 = bad2 = 0
    for s in scales:
        for x in xs + [F(0)]:
            want = rn32(min(max(x, -s * 1024), s * 1024) / s)
            n += 1
            bad1 += q_div(x, s, 1) != want
            bad2 += q_div(x, s, 2) != want
    print(f"{n} (x, scale) pairs: {bad1} mismatches after one correction, {bad2} after two")
    assert bad2 == 0


if __name__ == "__main__":
    main()
