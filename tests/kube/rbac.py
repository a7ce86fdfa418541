"""RBAC authorisation of service-account users (Roles, ClusterRoles and their bindings)."""

from __future__ import annotations

from collections.abc import Iterable


def _subject_matches(subject: dict, user: str, groups: list[str], binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_ns
        return user == f"system:serviceaccount:{namespace}:{subject.get('name')}"
    if kind == "User":
        return subject.get("name") == user
    if kind == "Group":
        return subject.get("name") in groups
    return False


def _rule_allows(rule: dict, verb: str, group: str, resource: str, name: str | None) -> bool:
    if not any(v in ("*", verb) for v in rule.get("verbs") or []):
        return False
    if not any(g in ("*", group) for g in rule.get("apiGroups") or []):
        return False
    base, _, sub = resource.partition("/")
    wanted = {resource, "*"} | ({f"*/{sub}"} if sub else set())
    if not any(r in wanted for r in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def user_groups(user: str) -> list[str]:
    groups = ["system:authenticated"]
    if user.startswith("system:serviceaccount:"):
        namespace = user.split(":")[2]
        groups += ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
    return groups


def authorize(
    user: str,
    verb: str,
    group: str,
    resource: str,
    namespace: str | None,
    name: str | None,
    roles: dict[tuple[str, str], dict],
    cluster_roles: dict[str, dict],
    bindings: Iterable[dict],
    cluster_bindings: Iterable[dict],
) -> bool:
    """Whether `user` may do `verb` on `resource` (`plural` or `plural/subresource`)."""
    groups = user_groups(user)

    def rules_of(role_ref: dict, binding_ns: str | None) -> list[dict]:
        if role_ref.get("kind") == "ClusterRole":
            role = cluster_roles.get(role_ref.get("name"))
        else:
            role = roles.get((binding_ns or "", role_ref.get("name")))
        return (role or {}).get("rules") or []

    for binding in cluster_bindings:
        if any(_subject_matches(s, user, groups, "") for s in binding.get("subjects") or []):
            rules = rules_of(binding.get("roleRef") or {}, None)
            if any(_rule_allows(rule, verb, group, resource, name) for rule in rules):
                return True
    if namespace is None:
        return False
    for binding in bindings:
        binding_ns = binding["metadata"].get("namespace")
        if binding_ns != namespace:
            continue
        subjects = binding.get("subjects") or []
        if any(_subject_matches(s, user, groups, binding_ns) for s in subjects):
            rules = rules_of(binding.get("roleRef") or {}, binding_ns)
            if any(_rule_allows(rule, verb, group, resource, name) for rule in rules):
                return True
    return False
