// grpo_loss.cu — the fused GRPO-family policy loss over N tokens (see kernels/src/grpo_loss.rs
// for the formulas, tie rules and clamps; `cpu::token_terms` there is the line-by-line reference).
//
// Per token t (f32 math): δ = clamp(ℓ−ℓ_old, ±20), ρ = e^δ, L = max(−Aρ, −A·clip(ρ, 1−ε_l, 1+ε_h)),
// dual clip L = min(L, −A·c) for A < 0, KL k1/k2/k3 to ℓ_ref, and
//   g_logp[t] = w·m·(−A·ρ·1[unclipped]·1[|ℓ−ℓ_old| ≤ 20] + β·k′),   g_entropy[t] = −c_H·w·m,
//   loss      = Σ w·m·(L + β·KL − c_H·H)   (f64),
// plus f64 sums of m, m·clipped_low, m·clipped_high, m·clipped_dual, m·ρ, m·KL for the stats.
// Masked tokens (m = 0) are skipped, so garbage there never reaches the sums.
//
// Layout: every input is a contiguous f32 [N]; logp_ref and entropy may be null (flags say
// which are present). partials is f64 [gridDim.x × 8]; out is f64 [8].
// Threads: kernel 1 (`grpo_loss_tokens`) is a grid-stride loop, one token per thread per step;
// each thread keeps 7 f64 running sums, reduced per block by a fixed-shape tree into
// partials[block]. Kernel 2 (`grpo_loss_finish`, one block) sums the partials in a fixed
// order. No atomics, so the loss and the stats are bitwise deterministic for a given N.
// Versions:
//   v1 grid-stride tokens + per-block f64 partials + one-block finish (current)

#define GRPO_SLOTS 8
#define GRPO_HAS_REF 1
#define GRPO_HAS_ENT 2
#define GRPO_DUAL 4

// NaN-preserving clamp with the comparison order of the Rust `clampf`.
__device__ __forceinline__ float grpo_clampf(float x, float lo, float hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

extern "C" __global__ void grpo_loss_tokens(
    const float* __restrict__ logp, const float* __restrict__ logp_old,
    const float* __restrict__ logp_ref, const float* __restrict__ adv,
    const float* __restrict__ mask, const float* __restrict__ weights,
    const float* __restrict__ entropy, float* __restrict__ g_logp, float* __restrict__ g_entropy,
    double* __restrict__ partials, u32 n, float eps_low, float eps_high, float dual_c, float beta,
    i32 kl_kind, float ent_coef, i32 flags) {
    __shared__ double scratch[32];
    const bool has_ref = flags & GRPO_HAS_REF, has_ent = flags & GRPO_HAS_ENT, dual = flags & GRPO_DUAL;
    const float lo = 1.0f - eps_low, hi = 1.0f + eps_high;
    double acc[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};  // loss, m, low, high, dual, ρ, KL

    // 64-bit index: with n close to 2^32, i + stride would wrap a u32 and never end the loop.
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float m = mask[i];
        if (m == 0.0f) {
            g_logp[i] = 0.0f;
            g_entropy[i] = 0.0f;
            continue;
        }
        const float w = weights[i], a = adv[i], lp = logp[i];
        const float raw = lp - logp_old[i];
        const bool in_range = raw >= -20.0f && raw <= 20.0f;
        const float ratio = expf(grpo_clampf(raw, -20.0f, 20.0f));
        float surr = fmaxf(-a * ratio, -a * grpo_clampf(ratio, lo, hi));
        bool c_low = false, c_high = false, c_dual = false, active = false;
        if (a > 0.0f) {
            c_high = ratio > hi;
            active = !c_high;
        } else if (a < 0.0f) {
            c_low = ratio < lo;
            if (dual) {
                c_dual = ratio > dual_c;
                surr = fminf(surr, -a * dual_c);
            }
            active = !c_low && !c_dual;
        }
        const float g_surr = (active && in_range) ? -a * ratio : 0.0f;
        float kl = 0.0f, g_kl = 0.0f;
        if (has_ref) {
            const float r = logp_ref[i];
            if (kl_kind == 1) {
                kl = lp - r;
                g_kl = 1.0f;
            } else if (kl_kind == 2) {
                const float diff = lp - r;
                kl = 0.5f * diff * diff;
                g_kl = diff;
            } else {
                const float d = r - lp;
                const float dc = grpo_clampf(d, -20.0f, 20.0f);
                const float em1 = expm1f(dc);
                const float v = em1 - dc;
                g_kl = (d >= -20.0f && d <= 20.0f && v >= -10.0f && v <= 10.0f) ? -em1 : 0.0f;
                kl = grpo_clampf(v, -10.0f, 10.0f);
            }
        }
        g_logp[i] = w * m * (g_surr + beta * g_kl);
        g_entropy[i] = -ent_coef * w * m;
        double tok = (double)surr;
        if (beta != 0.0f) tok += (double)beta * (double)kl;
        if (ent_coef != 0.0f && has_ent) tok -= (double)ent_coef * (double)entropy[i];
        const double m64 = (double)m;
        acc[0] += (double)w * m64 * tok;
        acc[1] += m64;
        acc[2] += c_low ? m64 : 0.0;
        acc[3] += c_high ? m64 : 0.0;
        acc[4] += c_dual ? m64 : 0.0;
        acc[5] += m64 * (double)ratio;
        acc[6] += m64 * (double)kl;
    }
    #pragma unroll
    for (int j = 0; j < 7; ++j) {
        const double s = block_sum_f64(acc[j], scratch);
        if (threadIdx.x == 0) partials[(u64)blockIdx.x * GRPO_SLOTS + j] = s;
    }
}

// One block: out[j] = Σ_b partials[b][j], each thread striding over blocks in a fixed order.
extern "C" __global__ void grpo_loss_finish(const double* __restrict__ partials, u32 nblocks,
                                            double* __restrict__ out) {
    __shared__ double scratch[32];
    for (int j = 0; j < 7; ++j) {
        double s = 0.0;
        for (u32 b = threadIdx.x; b < nblocks; b += blockDim.x) s += partials[(u64)b * GRPO_SLOTS + j];
        s = block_sum_f64(s, scratch);
        if (threadIdx.x == 0) out[j] = s;
    }
    if (threadIdx.x == 0) out[7] = 0.0;
}
