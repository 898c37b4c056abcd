/* Native CPU kernels of gradsketch, compiled on first use by gradsketch/sketch/_native.py.
 *
 * gs_fwht_{f32,f64}: in-place unnormalised-then-scaled Walsh–Hadamard transform of rows [r0, r1) of a
 * contiguous [rows, n] array, n a power of two (Sylvester order, H_n = H_2 ⊗ … ⊗ H_2, so that
 * gs_fwht(x) = scale · H x with H symmetric and H·H = n·I).
 *
 * The transform is cache-blocked in two phases: the row is viewed as a matrix [m, L] with L = 2^12
 * contiguous elements (16 KiB of float32, resident in L1).
 *   phase 1: H_L on every contiguous block of L (the fast index): in-register SIMD shuffles for the stages
 *            inside one 64-byte vector, then long contiguous butterflies (radix 4) for the rest;
 *   phase 2: H_m on the slow index, tile by tile: a tile is all m rows of W contiguous columns (≤ ~256 KiB,
 *            resident in L2); its log2(m) stages are contiguous W-wide butterflies, two stages per pass
 *            (radix 4). The scale is applied in the last pass.
 * Each element is therefore read from and written to main memory about twice, whatever n is.
 *
 * gs_sjlt_{f32,f64}: out[b, rows[k, j]] += vals[k, j] * x[b, j] for b in [r0, r1), j < n, k < s
 * (the CountSketch / sparse-JL scatter; out rows of length d are small enough to stay in cache);
 * gs_gather_{f32,f64}: its adjoint, out[b, j] = sum_k vals[k, j] * y[b, rows[k, j]];
 * gs_sjlt_i16_* and gs_gather_i16_*: the same with int16 rows (d <= 2^15);
 * gs_signs_{f32,f64}: rows of x times int8 ±1 signs (torch's float * int8 product goes through a slow
 * type-promoting loop: ~5x slower).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GS_L_LOG 12

/* The lowest stages (strides < one 64-byte vector: 16 floats or 8 doubles) are done in registers:
 * per stage one lane permutation (lane i takes lane i ^ h) and one multiply-add with ±1. Written with the
 * GCC/Clang vector extensions so that the compiler emits SIMD shuffles for whatever the target has. */
typedef float gs_vf __attribute__((vector_size(64)));
typedef int32_t gs_vfi __attribute__((vector_size(64)));
typedef double gs_vd __attribute__((vector_size(64)));
typedef int64_t gs_vdi __attribute__((vector_size(64)));

#if defined(__clang__)
#define GS_XOR16(v, h) __builtin_shufflevector(v, v, 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h,    \
                                               8 ^ h, 9 ^ h, 10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h)
#define GS_XOR8(v, h) __builtin_shufflevector(v, v, 0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h)
#else
#define GS_XOR16(v, h) __builtin_shuffle(v, (gs_vfi){0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h,    \
                                                     8 ^ h, 9 ^ h, 10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h})
#define GS_XOR8(v, h) __builtin_shuffle(v, (gs_vdi){0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h})
#endif
#define GS_SGN16(h) {(0 & h) ? -1.f : 1.f, (1 & h) ? -1.f : 1.f, (2 & h) ? -1.f : 1.f, (3 & h) ? -1.f : 1.f,     \
                     (4 & h) ? -1.f : 1.f, (5 & h) ? -1.f : 1.f, (6 & h) ? -1.f : 1.f, (7 & h) ? -1.f : 1.f,     \
                     (8 & h) ? -1.f : 1.f, (9 & h) ? -1.f : 1.f, (10 & h) ? -1.f : 1.f, (11 & h) ? -1.f : 1.f,   \
                     (12 & h) ? -1.f : 1.f, (13 & h) ? -1.f : 1.f, (14 & h) ? -1.f : 1.f, (15 & h) ? -1.f : 1.f}
#define GS_SGN8(h) {(0 & h) ? -1.0 : 1.0, (1 & h) ? -1.0 : 1.0, (2 & h) ? -1.0 : 1.0, (3 & h) ? -1.0 : 1.0,      \
                    (4 & h) ? -1.0 : 1.0, (5 & h) ? -1.0 : 1.0, (6 & h) ? -1.0 : 1.0, (7 & h) ? -1.0 : 1.0}

/* H_16 on every contiguous group of 16 floats of x[0, len), len a multiple of 16 */
static void lowvec_f32(float *restrict x, int64_t len) {
    const gs_vf s1 = GS_SGN16(1), s2 = GS_SGN16(2), s4 = GS_SGN16(4), s8 = GS_SGN16(8);
    for (int64_t i = 0; i < len; i += 16) {
        gs_vf v;
        memcpy(&v, x + i, sizeof(v));
        v = v * s1 + GS_XOR16(v, 1);
        v = v * s2 + GS_XOR16(v, 2);
        v = v * s4 + GS_XOR16(v, 4);
        v = v * s8 + GS_XOR16(v, 8);
        memcpy(x + i, &v, sizeof(v));
    }
}

/* H_8 on every contiguous group of 8 doubles */
static void lowvec_f64(double *restrict x, int64_t len) {
    const gs_vd s1 = GS_SGN8(1), s2 = GS_SGN8(2), s4 = GS_SGN8(4);
    for (int64_t i = 0; i < len; i += 8) {
        gs_vd v;
        memcpy(&v, x + i, sizeof(v));
        v = v * s1 + GS_XOR8(v, 1);
        v = v * s2 + GS_XOR8(v, 2);
        v = v * s4 + GS_XOR8(v, 4);
        memcpy(x + i, &v, sizeof(v));
    }
}

#define DEFINE_FWHT(T, SUF, VL)                                                                          \
/* butterflies of stride h >= 1 inside a contiguous block of len (both powers of two) */                \
static void stages_##SUF(T *restrict x, int64_t len, int64_t h0) {                                      \
    int64_t h = h0;                                                                                      \
    for (; 2 * h < len; h <<= 2) { /* radix 4: strides h and 2h in one pass */                           \
        for (int64_t i = 0; i < len; i += 4 * h) {                                                       \
            T *restrict a = x + i, *restrict b = a + h, *restrict c = b + h, *restrict e = c + h;        \
            for (int64_t j = 0; j < h; ++j) {                                                            \
                T p = a[j] + b[j], q = a[j] - b[j], r = c[j] + e[j], t = c[j] - e[j];                    \
                a[j] = p + r; c[j] = p - r; b[j] = q + t; e[j] = q - t;                                  \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    if (h < len) {                                                                                       \
        for (int64_t i = 0; i < len; i += 2 * h) {                                                       \
            T *restrict a = x + i, *restrict b = a + h;                                                  \
            for (int64_t j = 0; j < h; ++j) {                                                            \
                T p = a[j], q = b[j];                                                                    \
                a[j] = p + q; b[j] = p - q;                                                              \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}                                                                                                        \
                                                                                                         \
/* H on the slow index of the [m, L] view, columns [c0, c0 + w): the m x w tile is gathered into the     \
   contiguous buffer buf (rows L apart alias in the cache: L is a power of two), transformed there as a    \
   flat array whose butterfly strides are multiples of w, and scattered back with the scale */            \
static void slow_##SUF(T *restrict x, int64_t m, int64_t L, int64_t c0, int64_t w, T scale, T *restrict buf) { \
    for (int64_t k = 0; k < m; ++k) memcpy(buf + k * w, x + k * L + c0, (size_t)w * sizeof(T));          \
    stages_##SUF(buf, m * w, w);                                                                         \
    for (int64_t k = 0; k < m; ++k) {                                                                    \
        T *restrict dst = x + k * L + c0;                                                                \
        const T *restrict src = buf + k * w;                                                             \
        for (int64_t j = 0; j < w; ++j) dst[j] = src[j] * scale;                                         \
    }                                                                                                    \
}                                                                                                        \
                                                                                                         \
static int64_t tile_w_##SUF(int64_t m, int64_t L) {                                                      \
    int64_t w = (int64_t)(262144 / (m * (int64_t)sizeof(T)));                                            \
    if (w > L) w = L;                                                                                    \
    if (w < 16) w = 16;                                                                                  \
    return w;                                                                                            \
}                                                                                                        \
                                                                                                         \
static void scale_##SUF(T *restrict x, int64_t len, T scale) {                                          \
    if (scale == (T)1) return;                                                                           \
    for (int64_t j = 0; j < len; ++j) x[j] *= scale;                                                     \
}                                                                                                        \
                                                                                                         \
static void block_##SUF(T *restrict x, int64_t len) {                                                   \
    if (len >= VL) {                                                                                     \
        lowvec_##SUF(x, len);                                                                            \
        stages_##SUF(x, len, VL);                                                                        \
    } else {                                                                                             \
        stages_##SUF(x, len, 1);                                                                         \
    }                                                                                                    \
}                                                                                                        \
                                                                                                         \
/* returns 0, or -1 when the scratch tile cannot be allocated (nothing is changed then) */               \
int gs_fwht_##SUF(T *x, int64_t rows, int64_t n, int64_t r0, int64_t r1, double scale_d) {             \
    (void)rows;                                                                                          \
    T scale = (T)scale_d;                                                                                \
    int64_t L = (int64_t)1 << GS_L_LOG;                                                                  \
    T *buf = NULL;                                                                                       \
    int64_t m = n / L, w = 0;                                                                            \
    if (n > L) {                                                                                         \
        w = tile_w_##SUF(m, L);                                                                          \
        buf = (T *)malloc((size_t)(m * w) * sizeof(T));                                                  \
        if (!buf) return -1;                                                                             \
    }                                                                                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                                  \
        T *row = x + r * n;                                                                              \
        if (n <= L) {                                                                                    \
            block_##SUF(row, n);                                                                         \
            scale_##SUF(row, n, scale);                                                                  \
            continue;                                                                                    \
        }                                                                                                \
        for (int64_t i = 0; i < n; i += L) block_##SUF(row + i, L);                                      \
        for (int64_t c0 = 0; c0 < L; c0 += w) slow_##SUF(row, m, L, c0, w, scale, buf);                  \
    }                                                                                                    \
    free(buf);                                                                                           \
    return 0;                                                                                            \
}                                                                                                        \
                                                                                                         \
/* the two phases of one long row (n > L) separately, so that threads can share a row: blocks [b0, b1)  \
   of phase 1, then, once every block is done, columns [c0, c1) of phase 2 (c0, c1 multiples of 16) */   \
void gs_fwht_phase1_##SUF(T *row, int64_t n, int64_t b0, int64_t b1) {                                  \
    int64_t L = (int64_t)1 << GS_L_LOG;                                                                  \
    (void)n;                                                                                             \
    for (int64_t b = b0; b < b1; ++b) block_##SUF(row + b * L, L);                                       \
}                                                                                                        \
                                                                                                         \
int gs_fwht_phase2_##SUF(T *row, int64_t n, int64_t c0, int64_t c1, double scale_d) {                  \
    int64_t L = (int64_t)1 << GS_L_LOG, m = n / L, w = tile_w_##SUF(m, L);                               \
    T *buf = (T *)malloc((size_t)(m * w) * sizeof(T));                                                   \
    if (!buf) return -1;                                                                                 \
    for (int64_t c = c0; c < c1; c += w) slow_##SUF(row, m, L, c, (c + w <= c1 ? w : c1 - c), (T)scale_d, buf); \
    free(buf);                                                                                           \
    return 0;                                                                                            \
}                                                                                                        \
                                                                                                         \
/* A row-restricted Walsh–Hadamard factor on the fast index: for rows [r0, r1) of the contiguous [M, n]   \
   x and every group g of b contiguous inputs (b a power of two dividing n),                                \
       t[k] = x[g*b + src[k]] * mult[g*b + src[k]]    (src: a permutation of [0, b), or NULL = identity;  \
                                                        mult: NULL = all ones)                            \
       out[row, g, i] = scale * (H_b t)[sel[i]]       for i < r,                                          \
   i.e. out = scale * (I ⊗ (H_b)[sel] P) (mult ⊙ x), written to the contiguous [M, n/b, r] out.            \
   Returns -1 when the scratch buffer cannot be allocated. */                                            \
int gs_whtsel_##SUF(const T *x, int64_t n, int64_t b, const int32_t *src, const T *mult,                \
                    const int32_t *sel, int64_t r, double scale_d, T *out, int64_t r0, int64_t r1) {    \
    T scale = (T)scale_d;                                                                                \
    T *t = (T *)malloc((size_t)b * sizeof(T));                                                           \
    if (!t) return -1;                                                                                   \
    int64_t groups = n / b;                                                                              \
    for (int64_t row = r0; row < r1; ++row) {                                                            \
        const T *restrict xr = x + row * n;                                                              \
        T *restrict o = out + row * groups * r;                                                          \
        for (int64_t g = 0; g < groups; ++g) {                                                           \
            const T *restrict xg = xr + g * b;                                                           \
            if (src && mult) {                                                                           \
                const T *restrict mg = mult + g * b;                                                     \
                for (int64_t k = 0; k < b; ++k) t[k] = xg[src[k]] * mg[src[k]];                          \
            } else if (src) {                                                                            \
                for (int64_t k = 0; k < b; ++k) t[k] = xg[src[k]];                                       \
            } else if (mult) {                                                                           \
                const T *restrict mg = mult + g * b;                                                     \
                for (int64_t k = 0; k < b; ++k) t[k] = xg[k] * mg[k];                                    \
            } else {                                                                                     \
                memcpy(t, xg, (size_t)b * sizeof(T));                                                    \
            }                                                                                            \
            block_##SUF(t, b);                                                                           \
            for (int64_t i = 0; i < r; ++i) o[g * r + i] = t[sel[i]] * scale;                            \
        }                                                                                                \
    }                                                                                                    \
    free(t);                                                                                             \
    return 0;                                                                                            \
}                                                                                                        \
                                                                                                         \
/* The adjoint of gs_whtsel: x[row, g*b + src[k]] = mult[g*b + src[k]] * t[k] with                       \
   t = scale * H_b (y[row, g, :] placed at sel), for rows [r0, r1) of the contiguous [M, n/b, r] y. */   \
int gs_whtsel_t_##SUF(const T *y, int64_t n, int64_t b, const int32_t *src, const T *mult,              \
                      const int32_t *sel, int64_t r, double scale_d, T *x, int64_t r0, int64_t r1) {    \
    T scale = (T)scale_d;                                                                                \
    T *t = (T *)malloc((size_t)b * sizeof(T));                                                           \
    if (!t) return -1;                                                                                   \
    int64_t groups = n / b;                                                                              \
    for (int64_t row = r0; row < r1; ++row) {                                                            \
        const T *restrict yr = y + row * groups * r;                                                     \
        T *restrict xr = x + row * n;                                                                    \
        for (int64_t g = 0; g < groups; ++g) {                                                           \
            memset(t, 0, (size_t)b * sizeof(T));                                                         \
            for (int64_t i = 0; i < r; ++i) t[sel[i]] = yr[g * r + i] * scale;                           \
            block_##SUF(t, b);                                                                           \
            T *restrict xg = xr + g * b;                                                                 \
            if (src && mult) {                                                                           \
                const T *restrict mg = mult + g * b;                                                     \
                for (int64_t k = 0; k < b; ++k) xg[src[k]] = t[k] * mg[src[k]];                          \
            } else if (src) {                                                                            \
                for (int64_t k = 0; k < b; ++k) xg[src[k]] = t[k];                                       \
            } else if (mult) {                                                                           \
                const T *restrict mg = mult + g * b;                                                     \
                for (int64_t k = 0; k < b; ++k) xg[k] = t[k] * mg[k];                                    \
            } else {                                                                                     \
                memcpy(xg, t, (size_t)b * sizeof(T));                                                    \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    free(t);                                                                                             \
    return 0;                                                                                            \
}                                                                                                        \

/* IT: the row index type (int32_t, or int16_t for d <= 2^15: FJL stores its rows that way on the CPU) */
#define DEFINE_HASHED(T, SUF, IT, ISUF)                                                                  \
void gs_sjlt##ISUF##_##SUF(const T *x, int64_t n, T *out, int64_t d, const IT *idx, const T *vals,     \
                           int64_t s, int64_t r0, int64_t r1) {                                          \
    int64_t b = r0;                                                                                      \
    /* four rows at a time: the index and value streams are read once for four independent chains */    \
    for (; b + 4 <= r1; b += 4) {                                                                        \
        const T *restrict x0 = x + b * n, *restrict x1 = x0 + n, *restrict x2 = x1 + n, *restrict x3 = x2 + n; \
        T *restrict o0 = out + b * d, *restrict o1 = o0 + d, *restrict o2 = o1 + d, *restrict o3 = o2 + d; \
        for (int64_t k = 0; k < s; ++k) {                                                                \
            const IT *restrict ik = idx + k * n;                                                         \
            const T *restrict vk = vals + k * n;                                                         \
            for (int64_t j = 0; j < n; ++j) {                                                            \
                int64_t h = ik[j];                                                                       \
                T v = vk[j];                                                                             \
                o0[h] += v * x0[j]; o1[h] += v * x1[j]; o2[h] += v * x2[j]; o3[h] += v * x3[j];          \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (; b < r1; ++b) {                                                                                \
        const T *restrict xr = x + b * n;                                                                \
        T *restrict o = out + b * d;                                                                     \
        for (int64_t k = 0; k < s; ++k) {                                                                \
            const IT *restrict ik = idx + k * n;                                                         \
            const T *restrict vk = vals + k * n;                                                         \
            for (int64_t j = 0; j < n; ++j) o[ik[j]] += vk[j] * xr[j];                                   \
        }                                                                                                \
    }                                                                                                    \
}                                                                                                        \
                                                                                                         \
/* the adjoint gather: out[b, j] = Σ_k vals[k, j] * y[b, rows[k, j]], the k = 0 term first, then the others \
 * added in order (the same operations as y[:, rows[0]] * vals[0] + ...); y rows of length d stay in cache */ \
void gs_gather##ISUF##_##SUF(const T *y, int64_t d, T *out, int64_t n, const IT *idx, const T *vals,   \
                             int64_t s, int64_t r0, int64_t r1) {                                        \
    for (int64_t b = r0; b < r1; ++b) {                                                                  \
        const T *restrict yr = y + b * d;                                                                \
        T *restrict o = out + b * n;                                                                     \
        for (int64_t j = 0; j < n; ++j) o[j] = yr[idx[j]] * vals[j];                                     \
        for (int64_t k = 1; k < s; ++k) {                                                                \
            const IT *restrict ik = idx + k * n;                                                         \
            const T *restrict vk = vals + k * n;                                                         \
            for (int64_t j = 0; j < n; ++j) {                                                            \
                T t = yr[ik[j]] * vk[j];                                                                 \
                o[j] = o[j] + t;                                                                         \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
}

/* out[r, j] = x[r, j] * sg[j] for sg[j] = ±1 (int8), written as a sign flip (bit-equal to the product);
 * rows r in [r0, r1) of strided [rows, n] arrays; out may be x (in place) */
#define DEFINE_SIGNS(T, SUF)                                                                             \
void gs_signs_##SUF(T *out, int64_t out_stride, const T *x, int64_t x_stride, const int8_t *sg, int64_t n, \
                    int64_t r0, int64_t r1) {                                                            \
    for (int64_t r = r0; r < r1; ++r) {                                                                  \
        T *o = out + r * out_stride;                                                                     \
        const T *xr = x + r * x_stride;                                                                  \
        for (int64_t j = 0; j < n; ++j) o[j] = sg[j] < 0 ? -xr[j] : xr[j];                               \
    }                                                                                                    \
}

DEFINE_FWHT(float, f32, 16)
DEFINE_FWHT(double, f64, 8)
DEFINE_SIGNS(float, f32)
DEFINE_SIGNS(double, f64)
DEFINE_HASHED(float, f32, int32_t, )
DEFINE_HASHED(double, f64, int32_t, )
DEFINE_HASHED(float, f32, int16_t, _i16)
DEFINE_HASHED(double, f64, int16_t, _i16)

int gs_abi_version(void) { return 1; }
