"""A/B experiments: which arm of which experiment a request belongs to, sticky per (experiment, user).

A user hashes to one of :data:`~serving.config.BUCKETS` buckets per experiment: the first 8 bytes of
BLAKE2b(``"<experiment>\\x1f<user>"``) modulo 10,000 — stable across processes, hosts and Python versions
(never Python's salted ``hash()``). The arms own contiguous bucket ranges, laid out from bucket 0 in the order
the config writes them; buckets past the last arm are outside the experiment (no arm, served as without one).

The guarantee when shares change (same experiment name, same arm order): arm i owns
``[sum(n_0..n_{i-1}), sum(n_0..n_i))``, so a user changes arm only if their bucket lies between an old and a
new boundary. Growing or shrinking the *last* arm, or moving buckets between two adjacent arms, moves only the
buckets between the old and new boundary; every other user keeps their arm. Adding an arm at the end takes only
buckets nobody owned. Renaming the experiment reshuffles everyone (the name is in the hash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from serving.config import BUCKETS, ArmConfig, DomainConfig, ExperimentConfig, ServingConfig, routes


def bucket_of(experiment: str, user_id: str) -> int:
    """The user's bucket in ``experiment``, in [0, BUCKETS)."""
    digest = hashlib.blake2b(f"{experiment}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket_ranges(arms: tuple[ArmConfig, ...]) -> list[tuple[str, int, int]]:
    """``(arm, first bucket, end bucket)`` per arm: contiguous, in config order, from bucket 0."""
    out: list[tuple[str, int, int]] = []
    start = 0
    for arm in arms:
        out.append((arm.name, start, start + arm.buckets))
        start += arm.buckets
    return out


@dataclass(frozen=True, slots=True)
class Assignment:
    """A request's place in an experiment: decided once, carried by the answer and its impression."""

    experiment: str
    arm: str
    holdout: bool
    route: DomainConfig  # what serves it: the arm's generator and rules over the domain's


def arm_route(domain: DomainConfig, arm: ArmConfig) -> DomainConfig:
    """The arm's serving settings: its own keys over the domain's (a holdout arm: the domain's own route)."""
    if arm.holdout:
        return domain
    generator = arm.generator or domain.generator
    same_model = arm.generator is None or arm.generator == domain.generator
    return DomainConfig(
        name=domain.name,
        generator=generator,
        generator_version=arm.generator_version or (domain.generator_version if same_model else "v1"),
        checkpoint=arm.checkpoint or (domain.checkpoint if same_model else ""),
        rerank=arm.rerank if arm.rerank is not None else domain.rerank,
    )


class Experiments:
    """The experiments of a config by domain; :meth:`assign` is pure and cheap (one hash per request)."""

    def __init__(self, config: ServingConfig):
        by_route = routes(config)
        self.by_domain: dict[str, tuple[ExperimentConfig, list[tuple[int, Assignment]]]] = {}
        for exp in config.experiments:
            for domain in exp.domains or (config.default_domain,):
                base = by_route.get(domain) or next(iter(by_route.values()))
                base = DomainConfig(name=domain, generator=base.generator,
                                    generator_version=base.generator_version, checkpoint=base.checkpoint,
                                    rerank=base.rerank)
                ends = [
                    (end, Assignment(exp.name, arm.name, arm.holdout, arm_route(base, arm)))
                    for arm, (_, _, end) in zip(exp.arms, bucket_ranges(exp.arms), strict=True)
                    if arm.buckets > 0
                ]
                self.by_domain[domain] = (exp, ends)

    def __bool__(self) -> bool:
        return bool(self.by_domain)

    def assign(self, domain: str, user_id: str) -> Assignment | None:
        """The user's arm of the experiment running on ``domain``; None when none runs or the bucket is unowned."""
        found = self.by_domain.get(domain)
        if found is None:
            return None
        exp, ends = found
        bucket = bucket_of(exp.name, user_id)
        for end, assignment in ends:
            if bucket < end:
                return assignment
        return None

    def routes(self) -> dict[tuple[str, str, str], DomainConfig]:
        """``(domain, experiment, arm)`` -> its route, for every arm not served by its domain's own route."""
        return {(domain, a.experiment, a.arm): a.route for domain, (_, ends) in self.by_domain.items()
                for _, a in ends if not a.holdout}
