"""The K-FAC / EK-FAC operator over all tracked layers (docs/concepts.md).

Every matrix function goes through one method, :meth:`KFAC.power`, which works in the Kronecker eigenbasis (or the
low-rank eigenform) of each layer. Inputs and outputs are dicts from parameter name to tensor with the
parameter's shape; weight and bias of a layer are combined as ``V = [W | b]``. No dense ``d × d`` matrix is built
by any operator.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .algebra.block import KronBlock, block_summary
from .algebra.damping import Damping, spectrum
from .algebra.kron import kron_apply
from .algebra.woodbury import woodbury_power
from .collection import placement
from .collection.placement import block_on
from .collection.sums import LayerSums
from .config import KFACConfig, check_number
from .decompose.entry import decompose_all
from .errors import ConfigError, KronfisherError, KronfisherWarning, SpectrumError, VectorError
from .layers import LayerInfo, combine, split
from .report import CollectionReport

logger = logging.getLogger("kronfisher")


def check_vector(pname: str, value: Any) -> Tensor | None:
    """``value`` if it is a real floating-point tensor with data (or None); else :class:`VectorError` naming it.

    An integer result would be truncated and a complex one would lose its imaginary part (the Fisher is real), so
    both are refused rather than cast.
    """
    if value is None:
        return None
    if not isinstance(value, Tensor):
        fix = " (convert it with torch.as_tensor)" if hasattr(value, "__array__") or isinstance(value, list) else ""
        raise VectorError(f"Parameter {pname!r}: expected a torch.Tensor, got {type(value).__name__}{fix}.")
    if value.is_meta:
        raise VectorError(f"Parameter {pname!r}: a meta tensor has no data.")
    if value.is_complex():
        raise VectorError(
            f"Parameter {pname!r}: complex dtype {value.dtype} is not supported (the Fisher is real); apply the "
            "operator to the real and imaginary parts separately."
        )
    if not value.is_floating_point():
        raise VectorError(
            f"Parameter {pname!r}: dtype {value.dtype} is not floating point; convert it (e.g. .float()) so the "
            "result is not truncated."
        )
    return value


class KFAC:
    """Kronecker-factored curvature of a model: decomposed blocks per tracked layer plus the raw sums.

    Build it with :func:`kronfisher.fit`, :func:`kronfisher.capture` or :func:`kronfisher.load`.

    Attributes:
        weights_fingerprint: digests of the weights the factors were computed from, as stored in a factor file
            (set by :func:`kronfisher.load` and :func:`kronfisher.merge_files`; None otherwise). :meth:`save`
            writes them when no model is given.

    """

    weights_fingerprint: dict[str, Any] | None = None

    def __init__(
        self,
        infos: dict[str, LayerInfo],
        blocks: dict[str, KronBlock],
        cfg: KFACConfig,
        sums: dict[str, LayerSums] | None = None,
        report: CollectionReport | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.infos = dict(infos)
        # A dict is copied; another mutable mapping (the lazy per-layer blocks of kronfisher.io.load) is kept.
        self._blocks = dict(blocks) if isinstance(blocks, dict) else blocks
        self.cfg = cfg
        self.sums = sums
        self.report = report or CollectionReport()
        self._model_ref = weakref.ref(model) if model is not None else None
        self._param_index = {}
        for name, info in self.infos.items():
            self._param_index[info.weight_name] = name
            if info.bias_name:
                self._param_index[info.bias_name] = name

    # Construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_sums(
        cls,
        infos: dict[str, LayerInfo],
        sums: dict[str, LayerSums],
        cfg: KFACConfig,
        report: CollectionReport | None = None,
        model: nn.Module | None = None,
        *,
        spread: bool = False,
        on_layer: Callable[[str], None] | None = None,
        release: bool = False,
    ) -> KFAC:
        """Normalise and decompose accumulated sums (once) into an operator.

        ``spread=True`` spreads the eigendecompositions over the ranks of a process group (a collective: every rank
        calls it). ``on_layer(name)`` is called as each layer's factors are decomposed (progress bars). Layers
        without tokens (never fired) are left out. ``release=True``: each dense sum is freed as it is decomposed
        and the operator keeps no sums (a grouped run, docs/concepts.md).
        """
        live = {n: s for n, s in sums.items() if s.A.count > 0 and s.G.count > 0}
        blocks = decompose_all(live, cfg, spread=spread, on_layer=on_layer, release=release)
        kept = None if release else sums
        return cls({n: infos[n] for n in live}, blocks, cfg, sums=kept, report=report, model=model)

    def update_sums(self, sums: dict[str, LayerSums]) -> None:
        """Replace the factors by new sums; every block (and so every cached spectrum) is rebuilt (docs/concepts.md).

        EK-FAC eigenvalues belong to the old eigenbases: an EK-FAC operator becomes plain K-FAC, with a warning,
        until :func:`kronfisher.drivers.ekfac.correct` is run again (docs/concepts.md).
        """
        was_ekfac = any(b.is_ekfac for b in self._blocks.values())
        live = {n: s for n, s in sums.items() if s.A.count > 0 and s.G.count > 0}
        self._blocks = decompose_all(live, self.cfg)
        self.sums = sums
        if was_ekfac:
            warnings.warn(
                "update_sums: the EK-FAC eigenvalues were computed in the old eigenbases and are dropped; the "
                "operator is plain K-FAC until kronfisher.drivers.ekfac.correct(fisher, model, batches) runs again.",
                KronfisherWarning,
                stacklevel=2,
            )

    def set_blocks(self, blocks: Mapping[str, KronBlock]) -> None:
        """Replace decomposed blocks (e.g. after the EK-FAC pass). Old caches go with the old blocks."""
        unknown = set(blocks) - set(self.infos)
        if unknown:
            raise KronfisherError(f"Blocks for unknown layers: {sorted(unknown)}.")
        self._blocks.update(blocks)

    def attach_model(self, model: nn.Module) -> None:
        """Remember ``model`` (weakly) so that :meth:`natural_gradient` can read its ``.grad``."""
        self._model_ref = weakref.ref(model)

    @property
    def attached_model(self) -> nn.Module | None:
        """The model attached by :func:`kronfisher.fit`, :func:`kronfisher.load` or :meth:`attach_model`, if alive."""
        return self._model_ref() if self._model_ref is not None else None

    # Introspection --------------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Tracked layer names (in model order)."""
        return list(self._blocks)

    def block(self, name: str) -> KronBlock:
        """The decomposed block of one layer."""
        if name not in self._blocks:
            raise KeyError(f"Unknown layer {name!r}. Tracked layers: {self.layer_names[:8]}...")
        return self._blocks[name]

    @property
    def blocks(self) -> dict[str, KronBlock]:
        """All decomposed blocks (read-only view by convention)."""
        return dict(self._blocks)

    @property
    def is_ekfac(self) -> bool:
        """True when every block carries EK-FAC eigenvalues."""
        return bool(self._blocks) and all(b.is_ekfac for b in self._blocks.values())

    def _check_dense_size(self, name: str, n: int, what: str) -> None:
        if n > self.cfg.max_dense_elements:
            raise KronfisherError(
                f"{what} of layer {name!r} has {n} elements (> max_dense_elements={self.cfg.max_dense_elements}); "
                "it is a diagnostic for small layers."
            )

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Dense ``A`` and ``G`` of one layer (diagnostics; raises for factors above ``max_dense_elements``)."""
        b = self.block(name)
        self._check_dense_size(name, b.G.dim**2, "G")
        self._check_dense_size(name, b.A.dim**2, "A")
        return b.A.to_dense(), b.G.to_dense()

    def to_dense(self, name: str) -> Tensor:
        """The undamped dense block over the row-major flattening of ``V`` (docs/library.md): ``G ⊗ A`` or EK-FAC."""
        b = self.block(name)
        d = b.G.dim * b.A.dim
        self._check_dense_size(name, d * d, "The dense block")
        span, tail = b.kron_eigenvalues()
        p = b.G.vectors
        q = b.A.vectors.to(p.device)  # G may work elsewhere than A (a host fallback, docs/gpu.md)
        span = span.to(p.device)
        tail = None if tail is None else tail.to(p.device)
        # p ⊗ q ([d, r * s]) by einsum: torch.kron views its operands, which fails on column-major (eigh, QR) bases
        basis = torch.einsum("ik,jl->ijkl", p, q).reshape(d, -1)
        out = (basis * span.reshape(-1)) @ basis.t()
        if b.thin_side == "G" and tail is not None:
            comp = torch.eye(b.G.dim, dtype=p.dtype, device=p.device) - p @ p.t()
            out = out + torch.kron(comp, (q * tail) @ q.t())
        elif b.thin_side == "A" and tail is not None:
            comp = torch.eye(b.A.dim, dtype=q.dtype, device=q.device) - q @ q.t()
            out = out + torch.kron((p * tail) @ p.t(), comp)
        return out

    # Operators ------------------------------------------------------------------------------------------
    def power(
        self, vectors: Mapping[str, Tensor], p: float, damping: Damping | float | None = None
    ) -> dict[str, Tensor]:
        """``(F + δ)^p v`` for any real ``p`` under the configured (or given) damping (docs/concepts.md).

        Args:
            vectors: parameter name → tensor with the parameter's shape. Layers whose weight is absent are skipped;
                a missing bias enters as a zero column and is not returned. Entries for untracked
                parameters are ignored.
            p: real power; ``p < 0`` needs a positive damped spectrum.
            damping: None (config), a number (``δ = δ_A = δ_G``) or a :class:`~kronfisher.damping.Damping`.

        Returns:
            Dict with the same parameter names (tracked ones only) and shapes.

        Raises:
            ConfigError: ``p`` or ``damping`` is not a finite real number (``damping`` also ``>= 0``).
            VectorError: ``vectors`` is not a mapping, or a tensor of a tracked parameter is not a real
                floating-point tensor with data (numpy arrays, lists, integer, bool, complex or meta tensors).
            SpectrumError: ``p < 0`` with a spectrum that is not positive, or a result that overflows although the
                input is finite.

        """
        p = check_number("p", p, low=None)
        if damping is not None and not isinstance(damping, Damping):
            damping = check_number("damping", damping)
        damp = Damping.coerce(damping, self.cfg)
        if not isinstance(vectors, Mapping):
            raise VectorError(f"vectors must be a mapping from parameter name to tensor, got {type(vectors).__name__}.")
        out: dict[str, Tensor] = {}
        for name in self._blocks:
            info = self.infos[name]
            wname = info.weight_name
            if wname not in vectors:  # a tied weight may come under its other name (e.g. the embedding's)
                wname = next((a for a in self.report.tied.get(name, ()) if a in vectors), wname)
            w = check_vector(wname, vectors.get(wname))
            if w is None:
                continue
            b = check_vector(info.bias_name, vectors.get(info.bias_name)) if info.bias_name else None
            v = combine(info, w, b)
            res = self._apply(name, v, p, damp)
            if not bool(torch.isfinite(res).all()) and bool(torch.isfinite(v).all()):
                raise SpectrumError(
                    f"power p={p:g} of layer {name!r} overflows: the result is not finite although the vector is "
                    f"finite ({v.dtype} range exceeded); use a smaller |p| or a larger damping."
                )
            nw, nb = split(info, res)
            out[info.weight_name] = nw
            if nb is not None and b is not None and info.bias_name:
                out[info.bias_name] = nb
        return out

    def _apply(self, name: str, v: Tensor, p: float, damp: Damping) -> Tensor:
        block = self._blocks[name]
        if p == -1.0 and self.cfg.lowrank_solver == "woodbury" and block.representation == "lowrank":
            return woodbury_power(block, v, damp, name)
        span, tail = spectrum(block, p, damp, name)
        work = torch.promote_types(v.dtype, block.A.vectors.dtype)
        dev = block.G.device if block.representation == "lowrank" else block.A.vectors.device  # where G works

        def run(where: torch.device) -> Tensor:  # on the host after a real out-of-memory error (docs/gpu.md)
            b = block if where == dev else block_on(block, where)
            g, a = b.G.cast(work), b.A.cast(work)
            t = None if tail is None else tail.to(where, work)
            return kron_apply(v.to(where, work), g, a, span.to(where, work), t)

        what = f"the product of layer {name!r} (out={block.G.dim}, in={block.A.dim})"
        return placement.on_cpu_after_oom(run, dev, what).to(v.device, v.dtype)

    def fvp(self, vectors: Mapping[str, Tensor], damped: bool = False) -> dict[str, Tensor]:
        """Fisher-vector product ``F v`` (undamped unless ``damped``)."""
        return self.power(vectors, 1.0, None if damped else Damping.none())

    def whiten(self, vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``(F + δ)^{-1/2} v``."""
        return self.power(vectors, -0.5)

    def natural_gradient(self, grads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``(F + δ)^{-1} g`` of explicit gradients, or of the model's ``.grad`` when ``grads`` is None."""
        if grads is None:
            grads = self.model_grads()
        return self.power(grads, -1.0)

    def model_grads(self) -> dict[str, Tensor]:
        """``.grad`` of the tracked parameters of the attached model."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            raise ConfigError("No model attached: pass grads explicitly or call attach_model(model).")
        params = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head keeps its own name
        grads = {}
        for name in self._blocks:
            info = self.infos[name]
            for pname in (info.weight_name, info.bias_name):
                if pname and pname in params and params[pname].grad is not None:
                    grads[pname] = params[pname].grad
        if not grads:
            raise ConfigError("The attached model has no .grad on any tracked parameter; run a backward first.")
        return grads

    def save(self, path: str | os.PathLike[str], model: nn.Module | None = None, *, include_sums: bool = False) -> Path:
        """Write the factors (with ``include_sums``, also the raw sums) to a file (:func:`kronfisher.save`)."""
        # The one sanctioned upward import: io sits above the operator, and ``KFAC.save`` is public API.
        from .io.files import save  # noqa: PLC0415

        return save(self, path, model=model, include_sums=include_sums)

    def __repr__(self) -> str:
        reps: dict[str, int] = {}
        for b in self._blocks.values():
            reps[b.representation] = reps.get(b.representation, 0) + 1
        kind = "EK-FAC" if self.is_ekfac else "K-FAC"
        return f"KFAC({kind}, layers={len(self._blocks)}, representations={reps})"

    def summary(self) -> dict[str, Any]:
        """Per-layer dims, representation, token counts and traces (plain data)."""
        return {name: block_summary(self.infos[name], b) for name, b in self._blocks.items()}
