"""What a resume may change: every setting is applied and recorded, or refused.

A run restarted with another config than the checkpoint was trained with is compared field by
field with the experiment config saved in the checkpoint. Each field has one rule:

  refused   the checkpoint holds state built for the old value (the backbone's architecture,
            the class count, the centers' storage, the head optimizer's kind and state dtype,
            the seed of its rounding stream, the data source's kind); the error names the
            field, both values and what to do instead
  schedule  the learning rate at the resumed step would jump (the LR is a function of step,
            train.steps, the schedule's shape and the peak LRs): refused unless
            schedule.allow_change=true, then applied and recorded with the LRs before and after
  applied   everything else (margins, sample rate, optimizer hyperparameters, data knobs,
            cadences): the new value holds from the resumed step on - the config wins over
            hyperparameters restored with the optimizer - and rank 0 logs it and writes it to
            metrics.jsonl's "resume" record

`resume_policy(field)` is the table the README prints; `diff_configs` finds what changed.
"""
from typing import Any, Dict, List, Tuple

__all__ = ["REFUSED", "SCHEDULE", "APPLIED", "resume_policy", "diff_configs", "IGNORED"]

REFUSED, SCHEDULE, APPLIED = "refused", "schedule", "applied"

# why each refused field cannot change (the error says it)
_REFUSED = {
    "model": "the checkpoint's backbone weights are of this architecture",
    "head.num_classes": "the head shards hold this many classes",
    "head.weight_dtype": "the head shards store the centers in this dtype",
    "head.seed": "the head's sampler and rounding streams are seeded with it",
    "head_optim.name": "the checkpoint holds this optimizer's state",
    "head_optim.state_dtype": "the checkpoint holds the head optimizer's state in this dtype",
    "data.source": "the saved data position is in this kind of source",
}
_SCHEDULE = ("train.steps", "schedule.warmup_steps", "schedule.decay", "schedule.power",
             "schedule.min_lr_ratio", "schedule.apply_to_backbone", "head_optim.lr")
# fields that describe the restart itself, not the run
IGNORED = ("train.output_dir", "train.resume", "schedule.allow_change")


def resume_policy(field: str) -> Tuple[str, str]:
    """(rule, reason) for a dotted config field such as 'head.margin'."""
    for key, why in _REFUSED.items():
        if field == key or field.startswith(key + "."):
            return REFUSED, why
    if field in _SCHEDULE:
        return SCHEDULE, "the learning rate at the resumed step would jump"
    return APPLIED, "applied from the resumed step on"


def diff_configs(saved: Dict[str, Dict[str, Any]], new: Dict[str, Dict[str, Any]]
                 ) -> List[Tuple[str, Any, Any]]:
    """(field, saved value, new value) for every field that differs, in section order. Both
    are config_to_dict() dicts; a field missing from `saved` (a checkpoint of an older
    version) is not a change."""
    out = []
    for section, values in new.items():
        old_section = saved.get(section) or {}
        for key, value in values.items():
            field = f"{section}.{key}"
            if field in IGNORED or key not in old_section:
                continue
            old = old_section[key]
            if _norm(old) != _norm(value):
                out.append((field, old, value))
    return out


def _norm(v):
    """Tuples and lists compare equal (JSON has lists only); ints and floats by value."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
