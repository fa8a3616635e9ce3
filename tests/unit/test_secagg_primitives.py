"""Secure aggregation building blocks: Shamir sharing, the mask generator, keys and binding, fixed point,
the masking algebra (known answers of algorithms.md 5.4 and 5.7) and the SecAgg+ graph."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from p2pnode.errors import ConfigError
from p2pnode.secagg import graph, keys, shamir
from p2pnode.secagg.masking import mask_input, pair_sign, unmask_sum
from p2pnode.secagg.prg import MaskGenerator
from p2pnode.secagg.quantize import FixedPoint, choose_word_bits
from p2pnode.secagg.randomness import SeededRandomness, random_below


def rnd(seed: int = 0) -> SeededRandomness:
    return SeededRandomness(str(seed).encode())


# -- Shamir ---------------------------------------------------------------------------------------

def _miller_rabin(n: int, rounds: int = 40) -> bool:
    r = random.Random(1)
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(r.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_a_prime_above_every_32_byte_secret() -> None:
    assert shamir.PRIME > 2**256 - 1
    assert _miller_rabin(shamir.PRIME)
    assert not any(_miller_rabin(2**256 + c) for c in range(1, 297, 2))  # the smallest such prime


@pytest.mark.parametrize(("n", "t"), [(2, 2), (3, 2), (5, 3), (7, 5), (10, 7)])
def test_any_t_shares_reconstruct(n: int, t: int) -> None:
    secret = int.from_bytes(rnd(n).token_bytes(32), "big")
    shares = shamir.split(secret, list(range(1, n + 1)), t, rnd(t))
    for subset in itertools.combinations(range(1, n + 1), t):
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret
    assert shamir.consistent(shares, t)
    with pytest.raises(ValueError, match="cannot reconstruct"):
        shamir.combine({x: shares[x] for x in range(1, t)}, t)


def test_fewer_than_t_shares_do_not_determine_the_secret() -> None:
    # Exhaustively over a small field: with t = 3, the distribution of any 2 shares is the same for
    # every secret (each pair of values arises from exactly one polynomial per secret).
    p, xs = 11, [2, 5]
    for secret in range(p):
        seen: dict[tuple[int, ...], int] = {}
        for a1, a2 in itertools.product(range(p), repeat=2):
            pair = tuple((secret + a1 * x + a2 * x * x) % p for x in xs)
            seen[pair] = seen.get(pair, 0) + 1
        assert len(seen) == p * p and set(seen.values()) == {1}
    # In the real field: t - 1 shares and any candidate secret lie on one polynomial of degree t - 1,
    # so a full set of t shares exists that agrees with what was seen and opens to the candidate.
    secret = 12345
    shares = shamir.split(secret, [1, 2, 3, 4], 3, rnd())
    partial = {1: shares[1], 2: shares[2]}
    for candidate in (0, 1, secret, shamir.PRIME - 1):
        completed = {**partial, 3: shamir.interpolate({0: candidate, **partial}, 3)}
        assert shamir.combine(completed, 3) == candidate


def test_corrupt_share_is_detected_with_spare_shares() -> None:
    shares = shamir.split(42, [1, 2, 3, 4, 5], 3, rnd())
    bad = dict(shares)
    bad[4] = (bad[4] + 1) % shamir.PRIME
    assert not shamir.consistent(bad, 3)


def test_share_encoding_and_argument_checks() -> None:
    v = shamir.PRIME - 1
    assert shamir.decode(shamir.encode(v)) == v
    with pytest.raises(ValueError, match="field element"):
        shamir.decode(shamir.PRIME.to_bytes(33, "big"))
    with pytest.raises(ValueError, match="33 bytes"):
        shamir.decode(b"\x00" * 32)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(1, [1, 1], 2, rnd())
    with pytest.raises(ValueError, match=r"\[1, prime\)"):
        shamir.split(1, [0, 1], 2, rnd())
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(1, [1, 2], 3, rnd())


def test_random_below_is_in_range_and_covers_it() -> None:
    r = rnd()
    draws = [random_below(r, 6) for _ in range(600)]
    assert set(draws) == set(range(6))


# -- mask generator -------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["aes-256-ctr", "chacha20"])
@pytest.mark.parametrize("bits", [32, 64])
def test_mask_is_the_cipher_keystream_as_little_endian_words(algorithm: str, bits: int) -> None:
    seed = bytes(range(32))
    n = 1000
    gen = MaskGenerator(algorithm, bits, chunk_bytes=96)  # many chunks, not a multiple of the block size
    got = gen.stream(seed, n)
    if algorithm == "aes-256-ctr":
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    else:
        enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), None).encryptor()
    ref = np.frombuffer(enc.update(bytes(n * bits // 8)), dtype=f"<u{bits // 8}")
    assert np.array_equal(got, ref)
    acc = got.copy()
    gen.apply(acc, seed, -1)
    assert not acc.any()  # subtracting the same mask cancels exactly


@pytest.mark.parametrize("bits", [32, 64])
def test_all_masks_in_one_pass_equal_one_mask_at_a_time(bits: int) -> None:
    n = 1001
    masks = [(bytes([i]) * 32, 1 if i % 2 else -1) for i in range(5)]
    gen = MaskGenerator("aes-256-ctr", bits, chunk_bytes=200)  # many chunks, not a multiple of a block
    start = np.arange(n, dtype=gen.dtype)
    one_by_one = start.copy()
    for seed, sign in masks:
        gen.apply(one_by_one, seed, sign)
    together = start.copy()
    gen.apply_all(together, masks)
    assert np.array_equal(together, one_by_one)
    acc = start.copy()
    ranges = list(gen.chunks(acc, masks))
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert np.array_equal(acc, one_by_one)
    gen.apply_all(acc, [(seed, -sign) for seed, sign in masks])
    assert np.array_equal(acc, start)
    with pytest.raises(ValueError, match="signs"):
        gen.apply_all(acc, [(masks[0][0], 2)])


def test_mask_generator_refuses_short_seeds() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MaskGenerator().stream(b"\x01" * 4, 10)
    with pytest.raises(ValueError, match="unknown mask generator"):
        MaskGenerator("mt19937")


# -- masking algebra: known answers of algorithms.md 5.7 --------------------------------------------

def _u8(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint8)


def test_masks_cancel_known_answer() -> None:
    x = {1: _u8(5), 2: _u8(7), 3: _u8(11)}
    b = {1: _u8(17), 2: _u8(33), 3: _u8(120)}
    p = {(1, 2): _u8(200), (1, 3): _u8(50), (2, 3): _u8(99)}

    def pm(u: int) -> dict[int, np.ndarray]:
        return {v: p[(min(u, v), max(u, v))] for v in (1, 2, 3) if v != u}

    y = {u: mask_input(u, x[u], b[u], pm(u)) for u in (1, 2, 3)}
    assert [int(y[u][0]) for u in (1, 2, 3)] == [28, 141, 24]
    assert int(unmask_sum(y, b, {})[0]) == 23
    # User 3 drops after ShareKeys: y1 + y2 - b1 - b2 = 119, adding back p13 + p23 = 149 gives 12.
    two = {u: y[u] for u in (1, 2)}
    assert int(unmask_sum(two, {u: b[u] for u in (1, 2)}, {})[0]) == 119
    assert int(unmask_sum(two, {u: b[u] for u in (1, 2)}, {(3, 1): p[(1, 3)], (3, 2): p[(2, 3)]})[0]) == 12
    assert pair_sign(2, 1) == 1 and pair_sign(1, 2) == -1


# -- keys and binding ---------------------------------------------------------------------------

def test_agreement_seeds_and_share_encryption() -> None:
    r = rnd()
    a_sk, a_pk = keys.generate(r)
    b_sk, b_pk = keys.generate(r)
    digest = b"d" * 32
    s_ab = keys.agree(a_sk, b_pk)
    assert s_ab == keys.agree(b_sk, a_pk)
    assert keys.mask_seed(s_ab, digest, 1, 2) == keys.mask_seed(s_ab, digest, 2, 1)
    assert keys.mask_seed(s_ab, digest, 1, 2) != keys.mask_seed(s_ab, b"e" * 32, 1, 2)  # bound to the instance
    k12, k21 = keys.share_key(s_ab, digest, 1, 2), keys.share_key(s_ab, digest, 2, 1)
    assert k12 != k21  # one key per direction: the fixed nonce never repeats under a key
    ct = keys.encrypt_shares(k12, digest, 1, 2, 7, 9)
    assert len(ct) == keys.CIPHERTEXT_BYTES
    assert keys.decrypt_shares(k12, digest, 1, 2, ct) == (7, 9)
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    for args in ((k12, digest, 1, 2, tampered), (k12, b"e" * 32, 1, 2, ct), (k12, digest, 3, 2, ct),
                 (k21, digest, 1, 2, ct), (k12, digest, 1, 2, ct[:-1])):
        with pytest.raises(ValueError):
            keys.decrypt_shares(*args)
    assert keys.int_to_private(keys.private_to_int(a_sk)).private_bytes_raw() == a_sk.private_bytes_raw()


def test_low_order_and_short_keys_are_refused() -> None:
    for bad in (bytes(32), (1).to_bytes(32, "little"), b"\x09" * 31):
        with pytest.raises(ValueError):
            keys.check_public_key(bad)
    keys.check_public_key(keys.generate(rnd())[1])


def test_signature_binds_keys_to_identity_and_instance() -> None:
    ident = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    pub = ident.public_key().public_bytes_raw()
    payload = keys.advertise_payload(b"d" * 32, 3, "peer-a", b"c" * 32, b"m" * 32, b"h" * 32)
    sig = keys.sign(ident, payload)
    assert keys.verify(pub, sig, payload)
    for other in (keys.advertise_payload(b"e" * 32, 3, "peer-a", b"c" * 32, b"m" * 32, b"h" * 32),
                  keys.advertise_payload(b"d" * 32, 4, "peer-a", b"c" * 32, b"m" * 32, b"h" * 32),
                  keys.advertise_payload(b"d" * 32, 3, "peer-b", b"c" * 32, b"m" * 32, b"h" * 32),
                  keys.advertise_payload(b"d" * 32, 3, "peer-a", b"m" * 32, b"c" * 32, b"h" * 32)):
        assert not keys.verify(pub, sig, other)
    other_key = Ed25519PrivateKey.from_private_bytes(b"\x02" * 32).public_key().public_bytes_raw()
    assert not keys.verify(other_key, sig, payload)
    assert not keys.verify(pub, sig[:-1], payload)


def test_commitment_opens_only_with_its_seed() -> None:
    c = keys.commitment(b"d" * 32, 2, b"s" * 32)
    assert keys.commitment_matches(c, b"d" * 32, 2, b"s" * 32)
    assert not keys.commitment_matches(c, b"d" * 32, 2, b"t" * 32)
    assert not keys.commitment_matches(c, b"d" * 32, 3, b"s" * 32)


# -- fixed point: known answer of algorithms.md 5.4 ------------------------------------------------

def test_quantization_known_answer() -> None:
    fp = FixedPoint(dim=1, clip=8.0, levels=2**22)
    q1 = fp.encode(torch.tensor([0.5]))
    q2 = fp.encode(torch.tensor([-0.25]))
    assert int(q1[0]) == 2_228_224 and int(q2[0]) == 2_031_616  # exact: rounding is deterministic here
    assert int(q1[1]) == 2**22  # the weight coordinate: w / max_weight * Q
    total = q1 + q2
    assert int(total[0]) == 4_259_840
    s, ex, w = fp.decode_sum(total, 2)
    assert float(s[0]) == 0.25 and w == 2.0 and ex.numel() == 0


def test_quantization_error_is_below_one_step_and_unbiased() -> None:
    fp = FixedPoint(dim=20_000, clip=1.0, levels=2**10)
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    q = fp.encode(x, rng=np.random.default_rng(1))
    back, _, _ = fp.decode_sum(q, 1)
    err = back - x.double()
    assert float(err.abs().max()) <= fp.step
    assert abs(float(err.mean())) < 0.01 * fp.step * 3  # stochastic rounding is unbiased


def test_rounding_noise_drawn_ahead_gives_the_same_words_and_adds_into_masks() -> None:
    fp = FixedPoint(dim=5000, extras=3, clip=2.0, levels=2**16, extra_range=(-1.0, 3.0), max_weight=4.0)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    ex = torch.tensor([0.5, -2.0, 2.5])
    direct = fp.encode(x, 3.0, ex, rng=np.random.default_rng(7))
    noise = fp.draw_noise(np.random.default_rng(7))
    assert noise.shape == (5003,) and noise.dtype == np.float32  # 4 bytes per coordinate
    assert np.array_equal(fp.encode(x, 3.0, ex, noise=noise), direct)  # same generator, same words
    assert np.array_equal(fp.draw_noise(np.random.default_rng(7)), noise)  # deterministic from a seed
    masks = np.random.default_rng(3).integers(0, 2**32, size=fp.length, dtype=np.uint32)
    masks[-1] = 2**32 - 1  # the weight coordinate wraps too
    masked = masks.copy()
    assert fp.encode(x, 3.0, ex, noise=noise, add_to=masked) is masked
    assert np.array_equal(masked, masks + direct)  # modulo 2^32
    with pytest.raises(ValueError, match="noise"):
        fp.encode(x, 3.0, ex, noise=noise[:-1])
    with pytest.raises(ValueError, match="add to"):
        fp.encode(x, 3.0, ex, noise=noise, add_to=masked.astype(np.uint64))
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([0.0, float("inf")] + [0.0] * 4998), 3.0, ex, noise=noise, add_to=masked)
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(x, 3.0, torch.tensor([0.0, float("nan"), 0.0]), noise=noise)
    huge = torch.full((5000,), 1e308, dtype=torch.float64)  # finite, though their sum is not: clipped
    assert (fp.encode(huge, 3.0, ex, noise=noise)[:5000] == fp.levels).all()


def test_rounding_noise_drawn_ahead_is_unbiased_and_within_the_bound() -> None:
    # Every input sits at a quarter, a half or three quarters of a step: rounding is random for all.
    fp = FixedPoint(dim=30_000, clip=1.0, levels=2**10)
    frac = np.array([0.25, 0.5, 0.75])[np.arange(30_000) % 3]
    x = torch.from_numpy(((np.arange(30_000) % 1000 - 500) + frac) * fp.step)
    g = np.random.default_rng(11)
    errs = []
    for _ in range(4):
        masks = g.integers(0, 2**32, size=fp.length, dtype=np.uint32)
        y = fp.encode(x, noise=fp.draw_noise(g), add_to=masks.copy())
        back, _, _ = fp.decode_sum(y - masks, 1)
        errs.append(back - x)
    err = torch.stack(errs)
    assert float(err.abs().max()) < fp.step
    # E[err] = 0 per class of fraction: 120,000 / 3 draws, standard deviation of the mean < 0.003 step
    for k in range(3):
        assert abs(float(err[:, k::3].mean())) < 0.015 * fp.step
    # the rounding is random: about a quarter, half, three quarters of the draws round up
    up = (err > 0).double()
    for k, p in enumerate((0.25, 0.5, 0.75)):
        assert abs(float(up[:, k::3].mean()) - p) < 0.015


def test_decoding_in_ranges_equals_decoding_at_once() -> None:
    fp = FixedPoint(dim=100, extras=4, clip=3.0, levels=2**20, extra_range=(-2.0, 5.0), max_weight=2.0)
    words = np.random.default_rng(5).integers(0, 3 * 2**20, size=fp.length, dtype=np.uint32)
    at_once = fp.decode_sum(words, 3)
    ranges = [(0, 7), (7, 100), (100, 102), (102, 105)]
    split = fp.decode_sum(words, 3, ready=iter(ranges))
    assert torch.equal(at_once[0], split[0]) and torch.equal(at_once[1], split[1]) and at_once[2] == split[2]
    ref = words[:100].astype(np.float64) * (6.0 * 2.0 / 2**20) - 3 * 3.0 * 2.0
    assert np.array_equal(at_once[0].numpy(), ref)
    with pytest.raises(ValueError, match="in order"):
        fp.decode_sum(words, 3, ready=iter([(0, 7), (8, 105)]))
    with pytest.raises(ValueError, match="stopped"):
        fp.decode_sum(words, 3, ready=iter([(0, 7)]))


def test_weights_extras_and_clipping() -> None:
    fp = FixedPoint(dim=3, extras=2, clip=2.0, levels=2**16, extra_range=(0.0, 4.0), max_weight=10.0)
    g = np.random.default_rng(0)
    a = fp.encode(torch.tensor([1.0, -1.0, 5.0]), 4.0, torch.tensor([1.0, 2.0]), rng=g)
    b = fp.encode(torch.tensor([0.5, 0.5, 0.5]), 6.0, torch.tensor([3.0, 0.0]), rng=g)
    s, ex, w = fp.decode_sum(a + b, 2)
    # The third coordinate of `a` is clipped: 5 * 4/10 = 2.0 stays within [-2, 2] only just.
    assert torch.allclose(s, torch.tensor([4 * 1.0 + 6 * 0.5, 4 * -1.0 + 6 * 0.5, 4 * 5.0 + 6 * 0.5],
                                          dtype=torch.float64), atol=2 * fp.step * 10)
    assert torch.allclose(ex, torch.tensor([4 * 1.0 + 6 * 3.0, 4 * 2.0], dtype=torch.float64), atol=1e-3)
    assert w == pytest.approx(10.0, abs=1e-4)
    with pytest.raises(ValueError, match="weight"):
        fp.encode(torch.zeros(3), 11.0, torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(torch.tensor([0.0, float("nan"), 0.0]), 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="3 elements"):
        fp.encode(torch.zeros(4), 1.0, torch.zeros(2))


def test_overflow_bound_picks_the_modulus_and_refuses_overflow() -> None:
    assert choose_word_bits(2**22, 1023) == 32  # 1023 * 2^22 < 2^32
    assert choose_word_bits(2**22, 1024) == 64
    with pytest.raises(ConfigError, match="overflow"):
        choose_word_bits(2**22, 1024, 32)
    with pytest.raises(ConfigError, match="overflow"):
        choose_word_bits(2**52, 2**12)
    fp = FixedPoint(dim=2, levels=2**22, word_bits=64)
    q = fp.encode(torch.tensor([8.0, 8.0]))
    total = q * np.uint64(1500)  # the sum of 1500 copies: > 1023 summands, fine modulo 2^64
    s, _, _ = fp.decode_sum(total, 1500)
    assert float(s[0]) == pytest.approx(1500 * 8.0)


# -- SecAgg+ graph ------------------------------------------------------------------------------

def test_harary_graph_is_k_regular_symmetric_and_shared() -> None:
    n, k = 40, 6
    nb = graph.neighbours(n, k, b"seed")
    assert nb == graph.neighbours(n, k, b"seed")  # every party derives the same graph
    assert nb != graph.neighbours(n, k, b"other")
    for i, adj in enumerate(nb, start=1):
        assert len(adj) == k and i not in adj
        assert all(i in nb[j - 1] for j in adj)
    full = graph.neighbours(5, 4, b"seed")
    assert full[0] == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="even"):
        graph.neighbours(40, 5, b"seed")


def test_parameter_choice_grows_like_log_n_and_meets_its_targets() -> None:
    ks = {n: graph.choose_neighbours(n) for n in (100, 1000, 10_000)}
    assert ks[100] < ks[1000] < ks[10_000] <= 64
    for n, k in ks.items():
        c, p = graph.failure_bounds(n, k, graph.default_threshold(k + 1), 0.05, 0.05)
        assert c <= graph.CORRECTNESS_TARGET and p <= graph.PRIVACY_TARGET
    assert graph.choose_neighbours(10) == 9
    assert graph.default_threshold(10) == 7 and graph.min_threshold(10) == 6
