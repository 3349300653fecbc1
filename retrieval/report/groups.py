"""The report's "Near-duplicate groups" section (``report.duplicates``: a duplicates output's URL):
the largest groups of ``retrieval duplicates`` as contact sheets, each member's thumbnail with its
id and its number of links (kept pairs) inside the group, the representative first."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.compute as pc


@dataclass(frozen=True)
class Member:
    image_id: str
    uri: str
    degree: int


@dataclass(frozen=True)
class Sheet:
    group_id: int
    size: int
    representative: str
    members: list[Member] = field(default_factory=list)

    @property
    def more(self) -> int:
        """Members not shown."""
        return self.size - len(self.members)


def sheets(url: str | None, groups_shown: int, members_shown: int) -> list[Sheet]:
    """The ``groups_shown`` largest groups of the duplicates output ``url`` (none when off), up to
    ``members_shown`` members each: the representative, then by links, then by id."""
    if not url or groups_shown <= 0:
        return []
    from retrieval.duplicates.groups import read_groups

    t = read_groups(url)
    t = t.filter(pc.less(t.column("group_id"), groups_shown)).to_pylist()
    out: dict[int, Sheet] = {}
    for r in sorted(t, key=lambda r: (r["group_id"], r["image_id"] != r["representative"], -r["degree"],
                                      r["image_id"])):
        s = out.setdefault(r["group_id"], Sheet(r["group_id"], r["size"], r["representative"]))
        if len(s.members) < members_shown:
            s.members.append(Member(r["image_id"], r["uri"], r["degree"]))
    return [out[g] for g in sorted(out)]


def uris(shown: list[Sheet]) -> list[str]:
    """The URIs the section shows (for the thumbnails)."""
    return [m.uri for s in shown for m in s.members if m.uri]
