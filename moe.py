"""
Fine-grained top-k Mixture-of-Experts with per-modality shared experts (PAPER.md §6 "MoE").

    router (fp32 linear) -> softmax over E routed experts -> top-k, gates renormalised over the chosen k
    each token also runs its always-on shared expert(s): 'modality' = one text expert + one vision expert
    (each token uses its own modality's; the paper's best, Table 2), 'global' = one for everyone, or 'none'
    top_k counts ACTIVE experts including the shared one, so adding shared experts keeps compute fixed:
    routed k = top_k - 1 with a shared expert (the paper: 1 shared + 15 routed of 256, G = 16)

Dispatch is dropless: the (token, slot) pairs are sorted by expert and every expert runs on its contiguous
slice. Three interchangeable paths compute the same thing (tests compare each with a per-token reference):
    'grouped'  torch._grouped_mm over the slices (bf16 on CUDA; the CPU build also runs it in fp32)
    'padded'   slices scattered into an [E, C, D] buffer (C = the largest slice) and three bmm's: the fast
               CPU path; padding rows are zeros and are never read back, so nothing is dropped
    'loop'     a python loop over experts (the plain reference)

Load balance: the Switch loss E * sum_i f_i * P_i, with f_i the fraction of routed slots that chose expert i
and P_i the mean router probability of i, both over every token of the call (a whole micro-batch, and across
DDP ranks for f), since one sequence may be all text. It is 1 for uniform routing (f_i = P_i = 1/E) and
E/k for collapsed routing (every token to the same k experts with probability 1/k each); since f follows P
through the top-k, pushing it down spreads the load.
Softmax, not sigmoid, scores: they make P_i a distribution, so the loss has that closed-form minimum, and
renormalised top-k gates keep the output scale independent of E. Router z-loss: mean(logsumexp(logits)^2).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu_slices(x_SD, counts_E, w1, w3, w2):
    """Expert e's SwiGLU on its contiguous slice of x (rows sorted by expert): the plain loop."""
    out, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        xe = x_SD[start:start + n]
        out.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    return torch.cat(out)


def expert_hidden(d_model, granularity):
    """d_expert = 4 * d_model / G (PAPER.md §6: G = 4 d_model / d_expert)."""
    return 4 * d_model // granularity


class MoE(nn.Module):

    def __init__(self, d_model, d_expert, n_experts, top_k, shared='modality', dispatch='auto',
                 balance_coef=0.01, z_coef=1e-3):
        super().__init__()
        if shared not in ('none', 'global', 'modality'):
            raise ValueError(f"shared must be none, global or modality, got {shared!r}")
        if dispatch not in ('auto', 'grouped', 'padded', 'loop'):
            raise ValueError(f"dispatch must be auto, grouped, padded or loop, got {dispatch!r}")
        self.n_experts, self.shared, self.dispatch = n_experts, shared, dispatch
        self.k = top_k - (shared != 'none')  # routed experts per token
        if not 1 <= self.k <= n_experts:
            raise ValueError(f"top_k={top_k} with shared={shared!r} leaves {self.k} routed of {n_experts} experts")
        self.balance_coef, self.z_coef = balance_coef, z_coef
        E, D, Fh = n_experts, d_model, d_expert
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, D, Fh) * 0.02)  # gate, x @ w1[e]
        self.w3 = nn.Parameter(torch.randn(E, D, Fh) * 0.02)  # up
        self.w2 = nn.Parameter(torch.randn(E, Fh, D) * 0.02)  # down
        n_shared = {'none': 0, 'global': 1, 'modality': 2}[shared]
        if n_shared:
            self.s_w1 = nn.Parameter(torch.randn(n_shared, D, Fh) * 0.02)
            self.s_w3 = nn.Parameter(torch.randn(n_shared, D, Fh) * 0.02)
            self.s_w2 = nn.Parameter(torch.randn(n_shared, Fh, D) * 0.02)

    def count_params(self):
        """(total, active per token): a token runs k routed experts and one shared expert."""
        routed = self.w1.numel() + self.w3.numel() + self.w2.numel()
        total = sum(p.numel() for p in self.parameters())
        active = total - routed + routed * self.k // self.n_experts
        if self.shared == 'modality':
            active -= (self.s_w1.numel() + self.s_w3.numel() + self.s_w2.numel()) // 2
        return total, active

    # --- experts on sorted slices -------------------------------------------------

    def _experts_loop(self, x_SD, counts_E):
        return swiglu_slices(x_SD, counts_E, self.w1, self.w3, self.w2)

    def _experts_padded(self, x_SD, counts_E):
        E, C = self.n_experts, int(counts_E.max())
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_S = torch.repeat_interleave(torch.arange(E, device=x_SD.device), counts_E)
        row_S = torch.arange(len(x_SD), device=x_SD.device) - starts_E[expert_S]  # position inside the slice
        x_ECD = x_SD.new_zeros(E, C, x_SD.shape[1]).index_put((expert_S, row_S), x_SD)
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1)) * torch.bmm(x_ECD, self.w3)
        return torch.bmm(h_ECF, self.w2)[expert_S, row_S]

    def _experts_grouped(self, x_SD, counts_E):
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        dt = torch.bfloat16 if x_SD.is_cuda else x_SD.dtype  # the CUDA kernel takes bf16 only
        xb = x_SD.to(dt)
        h = F.silu(torch._grouped_mm(xb, self.w1.to(dt), offs=offs)) * torch._grouped_mm(xb, self.w3.to(dt), offs=offs)
        return torch._grouped_mm(h, self.w2.to(dt), offs=offs).to(x_SD.dtype)

    def _shared(self, x_TD, modality_T):
        if self.shared == 'none':
            return 0
        if self.shared == 'global':
            return (F.silu(x_TD @ self.s_w1[0]) * (x_TD @ self.s_w3[0])) @ self.s_w2[0]
        # per modality: each token through its own modality's expert (same sort-and-slice as routing)
        order = torch.argsort(modality_T, stable=True)
        counts = torch.bincount(modality_T, minlength=2)
        y = swiglu_slices(x_TD[order], counts, self.s_w1, self.s_w3, self.s_w2)
        return torch.empty_like(y).index_copy_(0, order, y)

    # --- forward --------------------------------------------------------------------

    def route(self, x_TD):
        """fp32 router: (logits, top-k gate weights renormalised, top-k expert ids)."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.router(x_TD.float())
        probs_TE = logits_TE.softmax(-1)
        gate_TK, idx_TK = probs_TE.topk(self.k, dim=-1)
        return logits_TE, probs_TE, gate_TK / gate_TK.sum(-1, keepdim=True), idx_TK

    def forward(self, x, modality):
        """x [..., D], modality [...] (0 text, 1 vision) -> (y [..., D], aux dict)."""
        shape = x.shape
        x_TD, mod_T = x.reshape(-1, shape[-1]), modality.reshape(-1)
        T, E, k = len(x_TD), self.n_experts, self.k
        logits_TE, probs_TE, gate_TK, idx_TK = self.route(x_TD)

        # dropless dispatch: sort the T*k (token, slot) pairs by expert
        idx_S = idx_TK.reshape(-1)
        order_S = torch.argsort(idx_S, stable=True)
        token_S = order_S // k
        counts_E = torch.bincount(idx_S, minlength=E)
        x_SD = x_TD[token_S]
        path = self.dispatch
        if path == 'auto':
            path = 'grouped' if x.is_cuda else 'padded'
        experts = {'grouped': self._experts_grouped, 'padded': self._experts_padded, 'loop': self._experts_loop}[path]
        y_SD = experts(x_SD, counts_E) * gate_TK.reshape(-1)[order_S, None].to(x.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)
        y_TD = y_TD + self._shared(x_TD, mod_T)

        # balance over the whole call (and the whole global batch under DDP), z-loss, statistics
        f_E = counts_E.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(f_E)
        f_E = f_E / f_E.sum()
        balance = self.balance_coef * E * (f_E * probs_TE.mean(0)).sum()
        z = self.z_coef * torch.logsumexp(logits_TE, -1).pow(2).mean()
        counts_ME = torch.bincount((idx_TK + E * mod_T[:, None]).reshape(-1), minlength=2 * E).view(2, E)
        return y_TD.view(shape), {'balance': balance, 'z': z, 'counts': counts_ME}


def naive_moe(moe, x, modality):
    """The obvious per-token loop (for tests): each token, its k routed experts weighted by its gates, plus
    its shared expert."""
    x_TD, mod_T = x.reshape(-1, x.shape[-1]), modality.reshape(-1)
    _, _, gate_TK, idx_TK = moe.route(x_TD)

    def swiglu(v, w1, w3, w2):
        return (F.silu(v @ w1) * (v @ w3)) @ w2

    rows = []
    for i in range(len(x_TD)):
        y = sum(gate_TK[i, j] * swiglu(x_TD[i], moe.w1[e], moe.w3[e], moe.w2[e]) for j, e in enumerate(idx_TK[i]))
        if moe.shared != 'none':
            s = 0 if moe.shared == 'global' else int(mod_T[i])
            y = y + swiglu(x_TD[i], moe.s_w1[s], moe.s_w3[s], moe.s_w2[s])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def routing_stats(counts_ME, k):
    """Selection rates and specialisation from routing counts [2, E] summed over many tokens (PAPER.md §6):
    R_m^(i) = C_m^(i) / (N_m k), S_i = (R_text - R_image) / (R_text + R_image) in [-1, 1].
    Classes (our thresholds): text if S >= 0.5, vision if S <= -0.5, multimodal between, dead if never chosen."""
    counts = counts_ME.double()
    n_tokens = counts.sum(1, keepdim=True) / k                       # N_m
    R = counts / (n_tokens * k).clamp(min=1)                         # [2, E]
    S = (R[0] - R[1]) / (R[0] + R[1]).clamp(min=1e-12)
    dead = counts.sum(0) == 0
    cls = ['dead' if d else 'text' if s >= 0.5 else 'vision' if s <= -0.5 else 'multimodal'
           for s, d in zip(S.tolist(), dead.tolist())]
    return {'R': R, 'S': S, 'classes': cls, 'n_text': cls.count('text'), 'n_vision': cls.count('vision'),
            'n_multimodal': cls.count('multimodal'), 'n_dead': int(dead.sum())}
