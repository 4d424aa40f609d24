"""lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval): `VARGPTLmms`, the model class it calls for image tasks.

    python -m vargpt.integrations.lmms_eval --model vargpt --model_args pretrained=PATH,dtype=bf16 \\
        --tasks mme,pope --batch_size 4 --output_path out/lmms
    # = lmms-eval's own command line, with ``vargpt`` registered first (no pretrained=: the embedded model)

Contract
--------
* ``VARGPTLmms(pretrained=None, device="auto", dtype=None, batch_size=1, seed=0)``; lmms-eval passes
  ``--model_args`` as strings, which are parsed here. ``pretrained`` None or empty = the embedded default model.
* `generate_until`: each request's ``args`` = (context, gen_kwargs, doc_to_visual, doc_id, task, split); the
  images are ``doc_to_visual(self.task_dict[task][split][doc_id])``. The answer is exactly `VARGPTPipeline.chat`'s
  for that question and images (same code path: an ``<image>`` placeholder per image in front of a context without
  one), greedy unless ``do_sample`` is true and ``temperature`` > 0, cut at the first of the ``until`` strings.
  Consecutive requests with equal gen_kwargs are batched (``batch_size``, left-padded).
* `loglikelihood`: args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split) -> (sum of the
  log-probs of the continuation's tokens after the chat prompt, whether each of them is the greedy choice); as in
  `chat`, ``<|image_gen_start|>`` is never a candidate (text answers only).
* `generate_until_multi_round`: args = (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split); round
  0 answers the context, round r > 0 asks ``doc_to_text(doc, previous_output=..., round_idx=r,
  previous_round_info=...)`` for (images, context, done, outputs so far, info) until done; returns the outputs.
* Single process (rank 0 of 1). When lmms-eval is importable the class subclasses its ``lmms`` base and is
  registered as ``vargpt`` at import; without it the class works duck-typed (tests need no lmms-eval).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vargpt.errors import InputError
from vargpt.pipeline import VARGPTPipeline

try:  # optional: lmms-eval's base class and registries
    from lmms_eval.api.model import lmms as _Base
except ImportError:
    _Base = object

__all__ = ["VARGPTLmms", "GenerationSettings", "register", "main"]

MODEL_NAME = "vargpt"
CLASS_PATH = "vargpt.integrations.lmms_eval.VARGPTLmms"
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationSettings:
    """lmms-eval's gen_kwargs, read once: greedy unless do_sample and temperature > 0."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    until: tuple[str, ...] = ()

    @classmethod
    def from_kwargs(cls, gen_kwargs: dict[str, Any] | None) -> GenerationSettings:
        kw = dict(gen_kwargs or {})
        if int(kw.get("num_beams") or 1) > 1:
            raise InputError(f"num_beams = {kw['num_beams']}: vargpt decodes greedily or by sampling; use num_beams 1")
        until = kw.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(kw["temperature"]) if kw.get("temperature") is not None else 1.0
        do_sample = bool(kw.get("do_sample", False)) and temperature > 0
        return cls(max_new_tokens=int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), do_sample=do_sample,
                   temperature=temperature if do_sample else 1.0,
                   top_p=float(kw["top_p"]) if do_sample and kw.get("top_p") is not None else 1.0,
                   until=tuple(u for u in until if u))

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string."""
        for stop in self.until:
            text = text.split(stop, 1)[0]
        return text


def _positive_int(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: give a positive integer (vargpt has no automatic batch size)") from None
    if n < 1:
        raise InputError(f"{name}={value!r}: give a positive integer")
    return n


def _images(visuals: Any) -> list[Image.Image]:
    """doc_to_visual's result as a flat list of PIL images (None or [] = none)."""
    flat: list[Any] = []
    for v in [visuals] if isinstance(visuals, Image.Image) else list(visuals or []):
        flat += list(v) if isinstance(v, (list, tuple)) else [v]
    for v in flat:
        if not isinstance(v, Image.Image):
            raise InputError(f"the task gave a {type(v).__name__} visual; vargpt answers about PIL images only "
                             "(no video or audio tasks)")
    return flat


class VARGPTLmms(_Base):
    """lmms-eval model over `VARGPTPipeline` (see the module docstring)."""

    is_simple = True  # lmms-eval: takes a context string + doc_to_visual (not chat messages)

    def __init__(self, pretrained: str | None = None, device: str | None = "auto", dtype: str | None = None,
                 batch_size: int | str = 1, seed: int | str = 0, max_batch_size: int | str | None = None) -> None:
        """``max_batch_size`` is accepted because lmms-eval's command line may pass it; it is unused."""
        super().__init__()
        self.batch_size = _positive_int(batch_size, "batch_size")  # bad arguments fail before the model loads
        self.seed = int(seed)
        self.pretrained = str(pretrained) if pretrained else None
        self.pipe = VARGPTPipeline.from_pretrained(self.pretrained, device=device or "auto",
                                                   dtype=dtype or None, progress=False)
        self.task_dict: dict[str, Any] = {}  # lmms-eval fills it: task -> split -> docs
        self._rank, self._world_size = 0, 1

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self.pipe.model.device

    # ---- helpers

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _cache(self, kind: str, key: tuple[Any, ...], value: Any) -> None:
        hook = getattr(self, "cache_hook", None)  # lmms-eval's response cache, when it gave us one
        if hook is not None:
            hook.add_partial(kind, key, value)

    def answer(self, items: Sequence[tuple[str, list[Image.Image]]], settings: GenerationSettings) -> list[str]:
        """Answers to (context, images) pairs in one left-padded batch: `VARGPTPipeline.chat`'s inputs and call."""
        pipe = self.pipe
        samples = [pipe.chat_inputs(context, images) for context, images in items]
        batch = samples[0] if len(samples) == 1 else pipe.processor.pad(samples, padding_side="left")
        rows = pipe.engine.generate_text(**pipe.chat_generate_kwargs(batch, settings.max_new_tokens, settings.do_sample,
                                                        settings.temperature, settings.top_p, self.seed))
        return [settings.cut("".join(p for p in row if isinstance(p, str))) for row in rows]

    @torch.no_grad()
    def score(self, context: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool]:
        """(log p(continuation | chat prompt of context + images), whether greedy decoding would produce it)."""
        pipe = self.pipe
        target = pipe.processor.tokenizer.encode(continuation)
        if not target:
            raise InputError("the continuation is empty; loglikelihood needs at least one token to score")
        inputs = pipe.chat_inputs(context, images)
        dev = pipe.model.device
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], 1).to(dev)
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        logits_TV = pipe.model(ids, torch.ones_like(ids), pixels.to(dev) if pixels is not None else None,
                               grid.to(dev) if grid is not None else None).logits[0, -len(target) - 1:-1].float()
        logits_TV[:, pipe.model.config.tokens.image_gen_start] = -torch.inf  # chat suppresses it (text answers)
        target_T = torch.tensor(target, device=dev)
        logp = logits_TV.log_softmax(-1).gather(1, target_T[:, None]).sum()
        return float(logp), bool((logits_TV.argmax(-1) == target_T).all())

    # ---- lmms-eval's API

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request, in request order (module docstring)."""
        out: list[str] = []
        i = 0
        while i < len(requests):
            gen_kwargs = requests[i].args[1]
            chunk = [requests[i]]
            while (len(chunk) < self.batch_size and i + len(chunk) < len(requests)
                   and requests[i + len(chunk)].args[1] == gen_kwargs):
                chunk.append(requests[i + len(chunk)])
            items = [(context, _images(to_visual(self._doc(task, split, doc_id))))
                     for context, _, to_visual, doc_id, task, split in (r.args for r in chunk)]
            answers = self.answer(items, GenerationSettings.from_kwargs(gen_kwargs))
            for (context, _), text in zip(items, answers, strict=True):
                self._cache("generate_until", (context, gen_kwargs), text)
            out += answers
            i += len(chunk)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log-prob, is greedy) of each request's continuation (module docstring)."""
        out = []
        for context, target, to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            out.append(self.score(context, continuation, _images(to_visual(doc))))
            self._cache("loglikelihood", (context, continuation), out[-1])
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Per request the answers of its rounds (module docstring), one request at a time."""
        out = []
        for context, gen_kwargs, to_visual, to_text, doc_id, task, split in (r.args for r in requests):
            settings = GenerationSettings.from_kwargs(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            visuals, outputs, info, round_idx = to_visual(doc), [], None, 0
            while True:
                if round_idx:
                    visuals, context, done, outputs, info = to_text(doc, previous_output=list(outputs),
                                                                    round_idx=round_idx, previous_round_info=info)
                    outputs = list(outputs)
                    if done:
                        break
                outputs += self.answer([(context, _images(visuals))], settings)
                round_idx += 1
            out.append(outputs)
        return out


def register() -> None:
    """Make ``--model vargpt`` resolve to `VARGPTLmms` in every lmms-eval registry present: the model registry of
    current releases, the ``module.Class`` table of 0.3 and the decorator registry of 0.2."""
    if _Base is object:
        raise InputError("lmms-eval is not installed; `pip install lmms-eval` to run its tasks")
    import lmms_eval.models as models
    from lmms_eval.api.registry import register_model

    register_model(MODEL_NAME)(VARGPTLmms)
    if getattr(models, "MODEL_REGISTRY_V2", None) is not None:
        from lmms_eval.models.registry_v2 import ModelManifest

        models.MODEL_REGISTRY_V2.register_manifest(ModelManifest(MODEL_NAME, simple_class_path=CLASS_PATH),
                                                   overwrite=True)
    elif isinstance(getattr(models, "AVAILABLE_MODELS", None), dict):
        models.AVAILABLE_MODELS[MODEL_NAME] = CLASS_PATH


def main(argv: list[str] | None = None) -> None:
    """lmms-eval's command line with ``vargpt`` registered."""
    from vargpt.integrations import lmms_eval as this  # the importable module (not __main__) owns the class

    try:
        this.register()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if _Base is not object and __name__ == "vargpt.integrations.lmms_eval":
    try:  # registering at import is how lmms-eval plugins announce models; a partly initialised lmms-eval (it
        register()  # imports us from its own registry while it initialises) must not break our import
    except (ImportError, AttributeError):
        pass

if __name__ == "__main__":
    main()
