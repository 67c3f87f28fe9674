/*
 * Fused CPU kernels for Mamba's selective scan and causal depthwise convolution.
 *
 * Layout is channels-last: sequences are [batch, length, channels] with unit stride
 * over channels, B and C are [batch, length, state] with unit stride over state.
 * Each work item owns one batch row and a block of LANES channels, so the
 * recurrence over time runs with the whole state block in registers/L1 and the
 * loops over the LANES channels vectorise.
 *
 * Scan:  dt_t = softplus(delta_t) (or delta_t as given)
 *        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
 *        y_t = (C_t . h_t + D * u_t) * silu(z_t)
 * Backward recomputes the states chunk by chunk from checkpoints taken in a
 * forward sweep and runs the adjoint recurrence in reverse time (linear in length).
 *
 * Built on first use by fairforget.mamba_scan and called through ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define LANES 16
#define CHUNK 32
#define MAX_STATE 256
#define MAX_KERNEL 16
#define INLINE static inline __attribute__((always_inline))

/* Cephes-style expf, written so that it vectorises (about 1 ulp). */
INLINE float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* Round to nearest with the 1.5 * 2^23 trick: floorf would not vectorise. */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

INLINE float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

/* Cephes-style logf for normal x > 0, written so that it vectorises. */
INLINE float fast_log(float x) {
    union { int32_t i; float f; } bits = {.f = x};
    float exponent = (float)(((bits.i >> 23) & 0xff) - 126);
    bits.i = (bits.i & 0x807fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    const int small = bits.f < 0.707106781186547524f;
    exponent = small ? exponent - 1.0f : exponent;
    const float m = small ? bits.f + bits.f - 1.0f : bits.f - 1.0f;
    const float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    p = p * m * z - 2.12194440e-4f * exponent - 0.5f * z;
    return m + p + 0.693359375f * exponent;
}

/* softplus(x) = log1p(exp(x)) (x beyond 20 passes through, as in torch); the log1p uses
 * log(w) * e / (w - 1) with w = 1 + e, which cancels the rounding of w for tiny e. */
INLINE float softplus(float x) {
    const float e = fast_exp(x), w = 1.0f + e;
    const float log1p_e = w == 1.0f ? e : fast_log(w) * (e / (w - 1.0f));
    return x > 20.0f ? x : log1p_e;
}

/* Pointer to element (batch b, time t, channel/state c) of a [batch, length, *] view. */
#define AT(ptr, sb, sl, b, t, c) ((ptr) + (int64_t)(b) * (sb) + (int64_t)(t) * (sl) + (c))

typedef struct {
    const float *data;
    int64_t batch_stride, time_stride;
} seq_view;

/* ------------------------------------------------------------------ scan */

/* Advance the state block by one time step; optionally accumulate C . h into y and keep the decays. */
INLINE void scan_step(int lanes, int nstate, const float *at, float *h, const float *dt,
                      const float *dtu, const float *bt, const float *ct, float *y, float *decay) {
    for (int n = 0; n < nstate; ++n) {
        const float bn = bt[n];
        const float cn = ct ? ct[n] : 0.0f;
#pragma omp simd
        for (int l = 0; l < lanes; ++l) {
            const int i = n * LANES + l;
            const float a = fast_exp(dt[l] * at[i]);
            const float hv = a * h[i] + dtu[l] * bn;
            h[i] = hv;
            if (y) y[l] += hv * cn;
            if (decay) decay[i] = a;
        }
    }
}

INLINE void load_lanes(int lanes, float *dst, const seq_view *v, int64_t b, int64_t t, int64_t d0) {
    const float *src = AT(v->data, v->batch_stride, v->time_stride, b, t, d0);
    for (int l = 0; l < lanes; ++l) dst[l] = src[l];
}

/* Time steps dt (softplus of the raw input when requested); slope gets d dt / d raw. */
INLINE void load_dt(int lanes, float *dst, float *slope, const seq_view *v, int use_softplus, int64_t b,
                    int64_t t, int64_t d0) {
    const float *src = AT(v->data, v->batch_stride, v->time_stride, b, t, d0);
#pragma omp simd
    for (int l = 0; l < lanes; ++l) {
        dst[l] = use_softplus ? softplus(src[l]) : src[l];
        if (slope) slope[l] = use_softplus ? sigmoid(src[l]) : 1.0f;
    }
}

/* A transposed to [state][LANES] for channels d0 .. d0 + lanes. */
INLINE void load_a_block(int lanes, int nstate, const float *a, int64_t d0, float *at) {
    for (int n = 0; n < nstate; ++n)
        for (int l = 0; l < lanes; ++l) at[n * LANES + l] = a[(d0 + l) * nstate + n];
}

INLINE void load_state(int lanes, int nstate, const float *h0, int64_t b, int64_t channels,
                       int64_t d0, float *h) {
    memset(h, 0, sizeof(float) * nstate * LANES);
    if (!h0) return;
    for (int n = 0; n < nstate; ++n)
        for (int l = 0; l < lanes; ++l) h[n * LANES + l] = h0[(b * channels + d0 + l) * nstate + n];
}

INLINE void scan_forward_block(int lanes, int64_t b, int64_t d0, int64_t length, int64_t channels,
                               int nstate, seq_view u, seq_view dt, int use_softplus, const float *a, seq_view bm,
                               seq_view cm, const float *dskip, seq_view z, const float *h0,
                               float *y, float *h_last) {
    float at[MAX_STATE * LANES], h[MAX_STATE * LANES];
    float ut[LANES], dtt[LANES], dtu[LANES], acc[LANES], zt[LANES];
    load_a_block(lanes, nstate, a, d0, at);
    load_state(lanes, nstate, h0, b, channels, d0, h);
    for (int64_t t = 0; t < length; ++t) {
        load_lanes(lanes, ut, &u, b, t, d0);
        load_dt(lanes, dtt, NULL, &dt, use_softplus, b, t, d0);
        if (z.data) load_lanes(lanes, zt, &z, b, t, d0);
        for (int l = 0; l < lanes; ++l) {
            dtu[l] = dtt[l] * ut[l];
            acc[l] = dskip ? dskip[d0 + l] * ut[l] : 0.0f;
        }
        scan_step(lanes, nstate, at, h, dtt, dtu, AT(bm.data, bm.batch_stride, bm.time_stride, b, t, 0),
                  AT(cm.data, cm.batch_stride, cm.time_stride, b, t, 0), acc, NULL);
        float *yt = y + (b * length + t) * channels + d0;
#pragma omp simd
        for (int l = 0; l < lanes; ++l) yt[l] = z.data ? acc[l] * zt[l] * sigmoid(zt[l]) : acc[l];
    }
    for (int n = 0; n < nstate; ++n)
        for (int l = 0; l < lanes; ++l) h_last[(b * channels + d0 + l) * nstate + n] = h[n * LANES + l];
}

void scan_forward(int64_t batch, int64_t length, int64_t channels, int64_t nstate,
                  const float *u, int64_t u_sb, int64_t u_sl,
                  const float *dt, int64_t dt_sb, int64_t dt_sl, int use_softplus,
                  const float *a,
                  const float *bm, int64_t b_sb, int64_t b_sl,
                  const float *cm, int64_t c_sb, int64_t c_sl,
                  const float *dskip,
                  const float *z, int64_t z_sb, int64_t z_sl,
                  const float *h0, float *y, float *h_last, int num_threads) {
    const seq_view vu = {u, u_sb, u_sl}, vdt = {dt, dt_sb, dt_sl}, vb = {bm, b_sb, b_sl},
                   vc = {cm, c_sb, c_sl}, vz = {z, z_sb, z_sl};
    const int64_t blocks = (channels + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < batch * blocks; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * LANES;
        const int lanes = channels - d0 < LANES ? (int)(channels - d0) : LANES;
        if (lanes == LANES)
            scan_forward_block(LANES, b, d0, length, channels, (int)nstate, vu, vdt, use_softplus, a, vb, vc, dskip,
                               vz, h0, y, h_last);
        else
            scan_forward_block(lanes, b, d0, length, channels, (int)nstate, vu, vdt, use_softplus, a, vb, vc, dskip,
                               vz, h0, y, h_last);
    }
}

/* Per-thread accumulators for gradients that are reduced over channels or batch. */
typedef struct {
    float *da, *dd, *db, *dc;
} partial_grads;

INLINE void scan_backward_block(int lanes, int64_t b, int64_t d0, int64_t length, int64_t channels,
                                int nstate, seq_view u, seq_view dt, int use_softplus, const float *a, seq_view bm,
                                seq_view cm, const float *dskip, seq_view z, const float *h0,
                                seq_view gy, float *checkpoints, float *chunk_states,
                                float *chunk_decays, float *chunk_core, float *du, float *ddt, float *dz, float *dh0,
                                partial_grads acc) {
    float at[MAX_STATE * LANES], h[MAX_STATE * LANES], carry[MAX_STATE * LANES];
    float da_block[MAX_STATE * LANES];
    float ut[LANES], dtt[LANES], dtu[LANES], zt[LANES], gt[LANES];
    float du_t[LANES], ddt_t[LANES], dd_block[LANES], dt_slope[LANES];
    const int64_t nchunks = (length + CHUNK - 1) / CHUNK;
    const int64_t block_floats = (int64_t)nstate * LANES;

    load_a_block(lanes, nstate, a, d0, at);
    load_state(lanes, nstate, h0, b, channels, d0, h);
    /* Forward sweep keeping only the state at the start of each chunk (the last chunk's
     * states are recomputed below anyway). */
    for (int64_t t = 0; t < (nchunks - 1) * CHUNK; ++t) {
        if (t % CHUNK == 0) memcpy(checkpoints + (t / CHUNK) * block_floats, h, sizeof(float) * block_floats);
        load_lanes(lanes, ut, &u, b, t, d0);
        load_dt(lanes, dtt, NULL, &dt, use_softplus, b, t, d0);
        for (int l = 0; l < lanes; ++l) dtu[l] = dtt[l] * ut[l];
        scan_step(lanes, nstate, at, h, dtt, dtu, AT(bm.data, bm.batch_stride, bm.time_stride, b, t, 0),
                  NULL, NULL, NULL);
    }
    if (nchunks > 0) memcpy(checkpoints + (nchunks - 1) * block_floats, h, sizeof(float) * block_floats);

    memset(carry, 0, sizeof(float) * block_floats);
    memset(da_block, 0, sizeof(float) * block_floats);
    memset(dd_block, 0, sizeof(dd_block));
    for (int64_t chunk = nchunks - 1; chunk >= 0; --chunk) {
        const int64_t t0 = chunk * CHUNK;
        const int64_t t1 = t0 + CHUNK < length ? t0 + CHUNK : length;
        /* Recompute the chunk: chunk_states[k] is h_{t0 + k - 1}, chunk_decays[k] exp(dt A) at t0 + k. */
        memcpy(chunk_states, checkpoints + chunk * block_floats, sizeof(float) * block_floats);
        for (int64_t t = t0; t < t1; ++t) {
            float *hk = chunk_states + (t - t0 + 1) * block_floats;
            float *core = chunk_core + (t - t0) * LANES;
            memcpy(hk, hk - block_floats, sizeof(float) * block_floats);
            load_lanes(lanes, ut, &u, b, t, d0);
            load_dt(lanes, dtt, NULL, &dt, use_softplus, b, t, d0);
            for (int l = 0; l < lanes; ++l) {
                dtu[l] = dtt[l] * ut[l];
                core[l] = dskip ? dskip[d0 + l] * ut[l] : 0.0f;
            }
            scan_step(lanes, nstate, at, hk, dtt, dtu, AT(bm.data, bm.batch_stride, bm.time_stride, b, t, 0),
                      AT(cm.data, cm.batch_stride, cm.time_stride, b, t, 0), core,
                      chunk_decays + (t - t0) * block_floats);
        }
        /* Adjoint recurrence in reverse time. */
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const float *h_cur = chunk_states + (t - t0 + 1) * block_floats;
            const float *h_prev = h_cur - block_floats;
            const float *decays = chunk_decays + (t - t0) * block_floats;
            const float *core = chunk_core + (t - t0) * LANES;
            const float *bt = AT(bm.data, bm.batch_stride, bm.time_stride, b, t, 0);
            const float *ct = AT(cm.data, cm.batch_stride, cm.time_stride, b, t, 0);
            float *db_t = acc.db + (b * length + t) * nstate;
            float *dc_t = acc.dc + (b * length + t) * nstate;
            const int64_t row = (b * length + t) * channels + d0;
            load_lanes(lanes, ut, &u, b, t, d0);
            load_dt(lanes, dtt, dt_slope, &dt, use_softplus, b, t, d0);
            load_lanes(lanes, gt, &gy, b, t, d0);
            if (z.data) {
                load_lanes(lanes, zt, &z, b, t, d0);
#pragma omp simd
                for (int l = 0; l < lanes; ++l) {
                    const float s = sigmoid(zt[l]);
                    dz[row + l] = gt[l] * core[l] * s * (1.0f + zt[l] * (1.0f - s));
                    gt[l] *= zt[l] * s;
                }
            }
            for (int l = 0; l < lanes; ++l) {
                dtu[l] = dtt[l] * ut[l];
                du_t[l] = dskip ? gt[l] * dskip[d0 + l] : 0.0f;
                dd_block[l] += gt[l] * ut[l];
                ddt_t[l] = 0.0f;
            }
            for (int n = 0; n < nstate; ++n) {
                const float bn = bt[n], cn = ct[n];
                float db_sum = 0.0f, dc_sum = 0.0f;
#pragma omp simd reduction(+ : db_sum, dc_sum)
                for (int l = 0; l < lanes; ++l) {
                    const int i = n * LANES + l;
                    const float decay = decays[i];
                    const float gh = carry[i] + gt[l] * cn; /* dL/dh_t */
                    const float g_decay = gh * h_prev[i] * decay;
                    dc_sum += gt[l] * h_cur[i];
                    db_sum += gh * dtu[l];
                    ddt_t[l] += g_decay * at[i] + gh * bn * ut[l];
                    du_t[l] += gh * dtt[l] * bn;
                    da_block[i] += g_decay * dtt[l];
                    carry[i] = gh * decay;
                }
                db_t[n] += db_sum;
                dc_t[n] += dc_sum;
            }
            for (int l = 0; l < lanes; ++l) {
                du[row + l] = du_t[l];
                ddt[row + l] = ddt_t[l] * dt_slope[l];
            }
        }
    }
    for (int n = 0; n < nstate; ++n)
        for (int l = 0; l < lanes; ++l) {
            acc.da[(d0 + l) * nstate + n] += da_block[n * LANES + l];
            if (dh0) dh0[(b * channels + d0 + l) * nstate + n] = carry[n * LANES + l];
        }
    for (int l = 0; l < lanes; ++l) acc.dd[d0 + l] += dd_block[l];
}

/* out[i] = sum over parts p of partials[p * part_stride + i]. */
static void reduce_partials(float *out, const float *partials, int64_t size, int64_t part_stride, int nparts) {
    if (!out) return;
    for (int64_t i = 0; i < size; ++i) {
        float s = 0.0f;
        for (int p = 0; p < nparts; ++p) s += partials[p * part_stride + i];
        out[i] = s;
    }
}

/* Gradients of scan_forward; du, ddt, dz are [batch, length, channels] contiguous,
 * db, dc [batch, length, state], da [channels, state], dd [channels], dh0 [batch, channels, state]
 * (dz, dd, dh0 may be NULL when the corresponding input is absent). Returns 0, or -1 on OOM. */
int scan_backward(int64_t batch, int64_t length, int64_t channels, int64_t nstate,
                  const float *u, int64_t u_sb, int64_t u_sl,
                  const float *dt, int64_t dt_sb, int64_t dt_sl, int use_softplus,
                  const float *a,
                  const float *bm, int64_t b_sb, int64_t b_sl,
                  const float *cm, int64_t c_sb, int64_t c_sl,
                  const float *dskip,
                  const float *z, int64_t z_sb, int64_t z_sl,
                  const float *h0,
                  const float *gy, int64_t g_sb, int64_t g_sl,
                  float *du, float *ddt, float *da, float *db, float *dc, float *dd, float *dz,
                  float *dh0, int num_threads) {
    const seq_view vu = {u, u_sb, u_sl}, vdt = {dt, dt_sb, dt_sl}, vb = {bm, b_sb, b_sl},
                   vc = {cm, c_sb, c_sl}, vz = {z, z_sb, z_sl}, vg = {gy, g_sb, g_sl};
    const int64_t blocks = (channels + LANES - 1) / LANES;
    const int64_t nchunks = (length + CHUNK - 1) / CHUNK;
    const int64_t block_floats = nstate * LANES;
    const int64_t da_size = channels * nstate, dd_size = channels, bc_size = batch * length * nstate;
    const int64_t part_size = da_size + dd_size + 2 * bc_size;
    float *partials = calloc((size_t)(num_threads * part_size), sizeof(float));
    int failed = 0;
    if (!partials) return -1;

#pragma omp parallel num_threads(num_threads)
    {
        const int tid = omp_get_thread_num();
        float *own = partials + tid * part_size;
        partial_grads acc = {own, own + da_size, own + da_size + dd_size, own + da_size + dd_size + bc_size};
        float *checkpoints = malloc(sizeof(float) * nchunks * block_floats);
        float *chunk_states = malloc(sizeof(float) * (CHUNK + 1) * block_floats);
        float *chunk_decays = malloc(sizeof(float) * CHUNK * block_floats);
        float *chunk_core = malloc(sizeof(float) * CHUNK * LANES);
        const int ok = checkpoints && chunk_states && chunk_decays && chunk_core;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < batch * blocks; ++item) {
            if (!ok) continue;
            const int64_t b = item / blocks, d0 = (item % blocks) * LANES;
            const int lanes = channels - d0 < LANES ? (int)(channels - d0) : LANES;
            if (lanes == LANES)
                scan_backward_block(LANES, b, d0, length, channels, (int)nstate, vu, vdt, use_softplus, a, vb, vc, dskip,
                                    vz, h0, vg, checkpoints, chunk_states, chunk_decays, chunk_core, du, ddt, dz, dh0, acc);
            else
                scan_backward_block(lanes, b, d0, length, channels, (int)nstate, vu, vdt, use_softplus, a, vb, vc, dskip,
                                    vz, h0, vg, checkpoints, chunk_states, chunk_decays, chunk_core, du, ddt, dz, dh0, acc);
        }
        free(checkpoints);
        free(chunk_states);
        free(chunk_decays);
        free(chunk_core);
    }
    if (!failed) {
        reduce_partials(da, partials, da_size, part_size, num_threads);
        reduce_partials(dd, partials + da_size, dd_size, part_size, num_threads);
        reduce_partials(db, partials + da_size + dd_size, bc_size, part_size, num_threads);
        reduce_partials(dc, partials + da_size + dd_size + bc_size, bc_size, part_size, num_threads);
    }
    free(partials);
    return failed ? -1 : 0;
}

/* ------------------------------------------------- causal conv + SiLU */

/* Pre-activation of the causal depthwise convolution (zero left padding). */
INLINE void conv_pre(int lanes, int kernel, const float *wt, const float *bias, int64_t d0,
                     const seq_view *x, int64_t b, int64_t t, float *pre) {
    for (int l = 0; l < lanes; ++l) pre[l] = bias ? bias[d0 + l] : 0.0f;
    for (int k = 0; k < kernel; ++k) {
        const int64_t src = t - (kernel - 1) + k;
        if (src < 0) continue;
        const float *xs = AT(x->data, x->batch_stride, x->time_stride, b, src, d0);
#pragma omp simd
        for (int l = 0; l < lanes; ++l) pre[l] += wt[k * LANES + l] * xs[l];
    }
}

INLINE void load_conv_weight(int lanes, int kernel, const float *w, int64_t d0, float *wt) {
    for (int k = 0; k < kernel; ++k)
        for (int l = 0; l < lanes; ++l) wt[k * LANES + l] = w[(d0 + l) * kernel + k];
}

INLINE void conv_forward_block(int lanes, int64_t d0, int64_t batch, int64_t length, int64_t channels,
                               int kernel, seq_view x, const float *w, const float *bias, float *out) {
    float wt[MAX_KERNEL * LANES], pre[LANES];
    load_conv_weight(lanes, kernel, w, d0, wt);
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < length; ++t) {
            conv_pre(lanes, kernel, wt, bias, d0, &x, b, t, pre);
            float *o = out + (b * length + t) * channels + d0;
#pragma omp simd
            for (int l = 0; l < lanes; ++l) o[l] = pre[l] * sigmoid(pre[l]);
        }
}

/* out = silu(causal_depthwise_conv(x, w) + bias); x [batch, length, channels], w [channels, kernel]. */
void conv_silu_forward(int64_t batch, int64_t length, int64_t channels, int64_t kernel,
                       const float *x, int64_t x_sb, int64_t x_sl, const float *w, const float *bias,
                       float *out, int num_threads) {
    const seq_view vx = {x, x_sb, x_sl};
    const int64_t blocks = (channels + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t d0 = blk * LANES;
        const int lanes = channels - d0 < LANES ? (int)(channels - d0) : LANES;
        if (lanes == LANES)
            conv_forward_block(LANES, d0, batch, length, channels, (int)kernel, vx, w, bias, out);
        else
            conv_forward_block(lanes, d0, batch, length, channels, (int)kernel, vx, w, bias, out);
    }
}

INLINE void conv_backward_block(int lanes, int64_t d0, int64_t batch, int64_t length, int64_t channels,
                                int kernel, seq_view x, const float *w, const float *bias, seq_view g,
                                float *dx, float *dw, float *dbias) {
    float wt[MAX_KERNEL * LANES], dwt[MAX_KERNEL * LANES], pre[LANES], gpre[LANES], db_acc[LANES];
    load_conv_weight(lanes, kernel, w, d0, wt);
    memset(dwt, 0, sizeof(dwt));
    memset(db_acc, 0, sizeof(db_acc));
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t t = 0; t < length; ++t)
            for (int l = 0; l < lanes; ++l) dx[(b * length + t) * channels + d0 + l] = 0.0f;
        for (int64_t t = 0; t < length; ++t) {
            conv_pre(lanes, kernel, wt, bias, d0, &x, b, t, pre);
            const float *gt = AT(g.data, g.batch_stride, g.time_stride, b, t, d0);
#pragma omp simd
            for (int l = 0; l < lanes; ++l) {
                const float s = sigmoid(pre[l]);
                gpre[l] = gt[l] * s * (1.0f + pre[l] * (1.0f - s));
                db_acc[l] += gpre[l];
            }
            for (int k = 0; k < kernel; ++k) {
                const int64_t src = t - (kernel - 1) + k;
                if (src < 0) continue;
                const float *xs = AT(x.data, x.batch_stride, x.time_stride, b, src, d0);
                float *dxs = dx + (b * length + src) * channels + d0;
#pragma omp simd
                for (int l = 0; l < lanes; ++l) {
                    dxs[l] += wt[k * LANES + l] * gpre[l];
                    dwt[k * LANES + l] += gpre[l] * xs[l];
                }
            }
        }
    }
    for (int k = 0; k < kernel; ++k)
        for (int l = 0; l < lanes; ++l) dw[(d0 + l) * kernel + k] = dwt[k * LANES + l];
    if (dbias)
        for (int l = 0; l < lanes; ++l) dbias[d0 + l] = db_acc[l];
}

/* Gradients of conv_silu_forward; dx is [batch, length, channels] contiguous. */
void conv_silu_backward(int64_t batch, int64_t length, int64_t channels, int64_t kernel,
                        const float *x, int64_t x_sb, int64_t x_sl, const float *w, const float *bias,
                        const float *gout, int64_t g_sb, int64_t g_sl, float *dx, float *dw, float *dbias,
                        int num_threads) {
    const seq_view vx = {x, x_sb, x_sl}, vg = {gout, g_sb, g_sl};
    const int64_t blocks = (channels + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t d0 = blk * LANES;
        const int lanes = channels - d0 < LANES ? (int)(channels - d0) : LANES;
        if (lanes == LANES)
            conv_backward_block(LANES, d0, batch, length, channels, (int)kernel, vx, w, bias, vg, dx, dw, dbias);
        else
            conv_backward_block(lanes, d0, batch, length, channels, (int)kernel, vx, w, bias, vg, dx, dw, dbias);
    }
}
