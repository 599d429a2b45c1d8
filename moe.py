"""
Fine-grained top-k Mixture-of-Experts with per-modality shared experts (docs/paper.md §6 "MoE").

    router (fp32 linear) -> softmax over the E routed experts -> top-k -> gates renormalised over the chosen k
    + always-on shared expert(s): 'modality' = one text expert and one vision expert, each token runs its own
      modality's (the paper's best, Table 2); 'global' = one for every token; 'none'
    top_k counts ACTIVE experts per token, the shared one included, so adding a shared expert keeps the active
    compute fixed: routed k = top_k - 1 (the paper: 1 shared + 15 routed of 256 per layer at G = 16)

Every expert is a SwiGLU of hidden size d_expert = 4 d_model / G (G the granularity, §6), stored stacked:
w1 [E, D, F] (gate), w3 [E, D, F] (up), w2 [E, F, D] (down); the shared experts are s_w1 / s_w3 / s_w2.

Dispatch is dropless: the T*k (token, slot) pairs are sorted by expert and every expert runs on its whole
contiguous slice, so no token is ever dropped and nothing is padded. Two paths compute the same function (tests
compare both with the per-token reference `naive_moe`, values and gradients, fp32 and bf16 autocast):
    'grouped'  torch._grouped_mm over the slices, offsets = cumulative counts as a device tensor: one call
               per weight, no host sync, no data-dependent shape (bf16 under autocast on CUDA; on CPU the
               experts run fp32 in eager mode, where that is faster than bf16, and bf16 when compiled, the only
               dtype torch 2.13 compiles _grouped_mm in on CPU)
    'loop'     a python loop over the experts' slices (their sizes read on the host): the plain fallback, and
               the benchmark's baseline
'auto' = grouped on CUDA and CPU alike, or loop when d_model or d_expert is not a multiple of 8 (the kernel's
16-byte stride rule). Both fold the gate into the hidden activation before the down projection (the expert is
linear in it, so that is exact) and sum each token's k rows with index_put_(accumulate=True). Expert loads are
counted with scatter_add (a fixed-size result), not bincount (whose size is data). bench.py --only=moe times
the two paths; docs/speed.md has the measurements.

Losses (both returned already multiplied by their coefficients, to be added to the training loss):
    balance  Switch loss E * sum_i f_i * P_i over every token of the call (a whole micro-batch, since one
             sequence may be all text), f counted across DDP ranks too. Default, since the paper says it uses
             auxiliary balancing losses (§6 Router); the auxiliary-loss-free bias of DeepSeek-V3 is not built.
    z        router z-loss mean(logsumexp(logits)^2) (ST-MoE): keeps the fp32 logits small.
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def count(idx, n):
    """How many times each of 0..n-1 occurs in idx: bincount with a fixed-size result, so no host sync."""
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


def expert_hidden(d_model, granularity):
    """d_expert = 4 d_model / G (docs/paper.md §6: G = 4 d_model / d_expert; G = 16 at d_model 2048 gives 512)."""
    if (4 * d_model) % granularity:
        raise ValueError(f"granularity {granularity} does not divide 4 * d_model = {4 * d_model}")
    return 4 * d_model // granularity


def balance_loss(probs_TE, counts_E):
    """Switch load-balancing loss E * sum_i f_i * P_i (unscaled).

    f_i = share of the routed (token, slot) pairs that chose expert i, summed over every DDP rank so the load
    is that of the global batch; P_i = mean router probability of expert i over this call's tokens (the
    differentiable half: its gradient E * f_i pushes down the probabilities of the overloaded experts).
    Perfectly uniform routing (f_i = P_i = 1/E) gives exactly 1, the documented minimum; routing that
    collapses onto the same k experts, each with probability 1/k, gives E * k * (1/k)^2 = E / k (E for top-1).
    (Strictly, f is a step function of P, and contrived routings where the popular expert wins each of its
    tokens by a hair score a little below 1, down to 0.875 for E = 2, k = 1; the P-gradient lowers the
    overloaded experts' probabilities until the load evens out, which is where training goes.)"""
    f_E = counts_E.to(torch.float32, copy=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(f_E)
    f_E = f_E / f_E.sum().clamp(min=1)
    return probs_TE.shape[-1] * (f_E * probs_TE.float().mean(0)).sum()


class MoE(nn.Module):

    def __init__(self, d_model, d_expert, n_experts, top_k, shared='modality', dispatch='auto',
                 balance_coef=0.01, z_coef=1e-3, n_modalities=2):
        super().__init__()
        if shared not in ('none', 'global', 'modality'):
            raise ValueError(f"shared must be none, global or modality, got {shared!r}")
        if dispatch not in ('auto', 'grouped', 'loop'):
            raise ValueError(f"dispatch must be auto, grouped or loop, got {dispatch!r}")
        self.n_experts, self.shared, self.dispatch = n_experts, shared, dispatch
        self.n_modalities = n_modalities
        self.k = top_k - (shared != 'none')  # routed experts per token: active compute stays top_k experts
        if not 1 <= self.k <= n_experts:
            raise ValueError(f"top_k={top_k} with shared={shared!r} leaves {self.k} routed of {n_experts} experts")
        self.balance_coef, self.z_coef = balance_coef, z_coef
        E, D, Fh = n_experts, d_model, d_expert
        self.router = nn.Linear(D, E, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        # std 0.02 everywhere; model.py rescales every parameter whose name ends in 'w2' (the residual
        # projections) to 0.02 / sqrt(2 n_layer), as for the dense FFN
        self.w1 = nn.Parameter(torch.randn(E, D, Fh) * 0.02)  # gate: x @ w1[e]
        self.w3 = nn.Parameter(torch.randn(E, D, Fh) * 0.02)  # up
        self.w2 = nn.Parameter(torch.randn(E, Fh, D) * 0.02)  # down
        n_shared = {'none': 0, 'global': 1, 'modality': n_modalities}[shared]
        for name, shape in (('s_w1', (n_shared, D, Fh)), ('s_w3', (n_shared, D, Fh)), ('s_w2', (n_shared, Fh, D))):
            self.register_parameter(name, nn.Parameter(torch.randn(shape) * 0.02) if n_shared else None)

    def count_params(self):
        """(total, active per token). A token runs the router, its k routed experts and (unless shared='none')
        one shared expert; each expert is 3 D F weights:
            total  = D E + 3 D F (E + n_shared)         n_shared = 0 / 1 / n_modalities
            active = D E + 3 D F (k + (shared != 'none'))  = D E + 3 D F top_k"""
        D, Fh = self.w1.shape[1:]
        per_expert = 3 * D * Fh
        total = sum(p.numel() for p in self.parameters())
        active = self.router.weight.numel() + per_expert * (self.k + (self.shared != 'none'))
        return total, active

    # --- routing ----------------------------------------------------------------------

    def route(self, x_TD):
        """-> logits [T, E] and probs [T, E] (fp32), gates [T, k] (fp32), expert ids [T, k].

        Softmax rather than sigmoid scores: P is then a distribution, which is what the Switch balance loss
        and its closed-form minimum assume, and renormalising the top-k gates to sum to 1 keeps the output
        scale independent of E and k. (Sigmoid scores pair with DeepSeek-V3's bias balancing, not built here.)
        With a single routed expert the renormalised gate would be identically 1 and the router would get no
        gradient from the task loss, so k = 1 keeps the raw probability as its gate, as Switch does."""
        with torch.autocast(x_TD.device.type, enabled=False):  # routing decisions in fp32 (docs/design.md)
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = logits_TE.softmax(-1)
        gate_TK, idx_TK = probs_TE.topk(self.k, dim=-1)
        if self.k > 1:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
        return logits_TE, probs_TE, gate_TK, idx_TK

    # --- experts on slices of rows sorted by expert -------------------------------------

    @staticmethod
    def _swiglu_loop(x_SD, counts, w1_EDF, w3_EDF, w2_EFD, gate_S):
        """One expert at a time on its contiguous slice (split/unbind: their backward is one cat/stack).
        gate_S (or None: all ones) scales each row's hidden activation."""
        out = []
        gates = [None] * len(counts) if gate_S is None else gate_S.split(counts)
        for x_sD, g_s, w1_DF, w3_DF, w2_FD in zip(x_SD.split(counts), gates,
                                                  w1_EDF.unbind(0), w3_EDF.unbind(0), w2_EFD.unbind(0)):
            h_sF = F.silu(x_sD @ w1_DF) * (x_sD @ w3_DF)
            out.append((h_sF if g_s is None else h_sF * g_s[:, None]) @ w2_FD)
        return torch.cat(out)

    @staticmethod
    def _swiglu_grouped(x_SD, counts_E, w1_EDF, w3_EDF, w2_EFD, gate_S):
        """torch._grouped_mm(a [S, D], b [E, D, F], offs=int32 cumulative row counts [E]) -> [S, F]: slice e of
        a times b[e] (an empty slice is fine). Autocast does not cover it, so cast by hand to the autocast dtype
        (the fast CUDA kernel is bf16; CPU, torch 2.13, also runs fp32 with gradients). Row strides must be
        multiples of 16 bytes (D and F multiples of 8 in bf16). gate_S (or None) scales each hidden row."""
        dev = x_SD.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_SD.dtype
        if dev == 'cpu' and torch.compiler.is_compiling():
            dt = torch.bfloat16  # torch 2.13 compiles CPU _grouped_mm in bf16 only
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        x_SD = x_SD.to(dt)
        h_SF = (F.silu(torch._grouped_mm(x_SD, w1_EDF.to(dt), offs=offs_E))
                * torch._grouped_mm(x_SD, w3_EDF.to(dt), offs=offs_E))
        if gate_S is not None:
            h_SF = (h_SF * gate_S[:, None]).to(dt)
        return torch._grouped_mm(h_SF, w2_EFD.to(dt), offs=offs_E)

    def _routed(self, x_TD, gate_TK, idx_TK, path):
        """Sum over each token's k routed experts of gate * expert(x), dropless."""
        K, E = idx_TK.shape[1], self.n_experts
        idx_S = idx_TK.reshape(-1)                      # expert of each (token, slot) pair, S = T k
        counts_E = count(idx_S, E)
        order_S = torch.argsort(idx_S, stable=True)     # j-th pair in expert order = pair order_S[j]
        gate_S = gate_TK.reshape(-1)[order_S]
        token_S = order_S // K                          # token of each sorted pair
        x_SD = x_TD[token_S]
        if path == 'grouped':
            y_SD = self._swiglu_grouped(x_SD, counts_E, self.w1, self.w3, self.w2, gate_S)
        else:
            y_SD = self._swiglu_loop(x_SD, counts_E.tolist(), self.w1, self.w3, self.w2, gate_S)
        # accumulate in x's dtype (fp32 residual stream under autocast: the k-term sum is not rounded to bf16).
        # index_put_(accumulate) rather than index_add_: its backward is an aten::index gather, ~3x faster on
        # this CPU than the index_select that index_add_'s backward runs
        return torch.zeros_like(x_TD).index_put_((token_S,), y_SD.to(x_TD.dtype), accumulate=True)

    def _shared(self, x_TD, modality_T, path):
        """Always-on expert(s): every token through the global one, or through its own modality's."""
        if self.shared == 'global':
            return (F.silu(x_TD @ self.s_w1[0]) * (x_TD @ self.s_w3[0])) @ self.s_w2[0]
        # per modality: sort tokens by modality and run M large slices (a loop of M = 2 costs nothing)
        order_T = torch.argsort(modality_T, stable=True)
        counts_M = count(modality_T, self.n_modalities)
        if path == 'grouped':
            y_TD = self._swiglu_grouped(x_TD[order_T], counts_M, self.s_w1, self.s_w3, self.s_w2, None)
        else:
            y_TD = self._swiglu_loop(x_TD[order_T], counts_M.tolist(), self.s_w1, self.s_w3, self.s_w2, None)
        return torch.zeros_like(x_TD).index_put_((order_T,), y_TD.to(x_TD.dtype))  # unsort (a permutation)

    # --- forward ------------------------------------------------------------------------

    def forward(self, x, modality):
        """x [..., D], modality [...] long (0 text, 1 vision) -> (y [..., D], aux).

        aux: 'balance' and 'z' (scalars, already times their coefficients), 'counts' [n_modalities, E] long:
        how many tokens of each modality selected each routed expert in this call (for routing_stats)."""
        x_TD, mod_T = x.reshape(-1, x.shape[-1]), modality.reshape(-1)
        E = self.n_experts
        path = self.dispatch
        if path == 'auto':  # _grouped_mm needs 16-byte row strides: D and F multiples of 8 in bf16
            path = 'grouped' if all(n % 8 == 0 for n in self.w1.shape[1:]) else 'loop'
        logits_TE, probs_TE, gate_TK, idx_TK = self.route(x_TD)
        # CPU autocast would cast every expert bank to bf16 at every call, and the CPU's bf16 GEMMs on expert
        # slices are slower than fp32 ones: in eager mode on CPU the experts run fp32 (docs/speed.md); CUDA, and
        # a compiled CPU block (torch 2.13 compiles CPU _grouped_mm in bf16 only), keep bf16
        cpu_amp = (x_TD.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
                   and not torch.compiler.is_compiling())
        with torch.autocast('cpu', enabled=False) if cpu_amp else nullcontext():
            x_in = x_TD.float() if cpu_amp else x_TD
            y_TD = self._routed(x_in, gate_TK, idx_TK, path)
            if self.shared != 'none':
                y_TD = y_TD + self._shared(x_in, mod_T, path)

        counts_ME = count((idx_TK + E * mod_T[:, None]).reshape(-1), self.n_modalities * E).view(self.n_modalities, E)
        aux = {'balance': self.balance_coef * balance_loss(probs_TE, counts_ME.sum(0)),
               'z': self.z_coef * torch.logsumexp(logits_TE, -1).square().mean(),
               'counts': counts_ME}
        return y_TD.view(x.shape), aux


def naive_moe(moe, x, modality):
    """The obvious per-token loop, for tests: route each token on its own (fp32 softmax, top-k, renormalise),
    add its k routed experts weighted by their gates, then its shared expert. Computes in fp32."""
    x_TD, mod_T = x.reshape(-1, x.shape[-1]).float(), modality.reshape(-1)

    def swiglu(v, w1, w3, w2):
        return (F.silu(v @ w1.float()) * (v @ w3.float())) @ w2.float()

    rows = []
    for i in range(len(x_TD)):
        p = torch.softmax(moe.router.weight.float() @ x_TD[i], -1)
        g, e = p.topk(moe.k)
        g = g / g.sum() if moe.k > 1 else g
        y = sum(g[j] * swiglu(x_TD[i], moe.w1[e[j]], moe.w3[e[j]], moe.w2[e[j]]) for j in range(moe.k))
        if moe.shared != 'none':
            s = 0 if moe.shared == 'global' else int(mod_T[i])
            y = y + swiglu(x_TD[i], moe.s_w1[s], moe.s_w3[s], moe.s_w2[s])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def routing_stats(counts, top_k_routed):
    """Selection rates and modality specialisation from routing counts [M, E] summed over many batches
    (docs/paper.md §6 "Specialisation"; modality 0 = text, 1 = vision):

        N_m = tokens of modality m = sum_i C_m^(i) / k      R_m^(i) = C_m^(i) / (N_m k)
        S_i = (R_text - R_image) / (R_text + R_image)  in [-1, 1]   (NaN for an expert nobody chose)

    Classes (the paper states no thresholds; ours): text if S_i >= 0.5 (text tokens choose it at >= 3x the
    image rate), vision if S_i <= -0.5, multimodal in between, dead if never selected. Rates are shares of
    each modality's own selections, so the text/image token ratio of the data does not bias S."""
    C = torch.as_tensor(counts).double()
    N = C.sum(1) / top_k_routed
    R = C / (N[:, None] * top_k_routed).clamp(min=1)
    S = (R[0] - R[1]) / (R[0] + R[1])
    dead = C.sum(0) == 0
    classes = ['dead' if d else 'text' if s >= 0.5 else 'vision' if s <= -0.5 else 'multimodal'
               for s, d in zip(S.tolist(), dead.tolist())]
    return {'N': N, 'R': R, 'S': S, 'classes': classes, 'n_text': classes.count('text'),
            'n_vision': classes.count('vision'), 'n_multimodal': classes.count('multimodal'),
            'n_dead': int(dead.sum())}
