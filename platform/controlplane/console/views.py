"""The customer console (`/console/`): server-rendered pages on the API's own services.

Every write goes through the service the API calls (accounts.services, with the
session's `Principal`: see session.py), so roles, scopes, audit records and key rules
are the API's. Objects are fetched scoped to the session's organization: a foreign id
is the same 404 page as an unknown one. Forms carry Django's CSRF token; htmx requests
(revoking a key in place) send it too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from functools import wraps
from typing import Any

from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from controlplane.accounts import services as account_services
from controlplane.accounts.models import APIKey
from controlplane.audit.services import Actor
from controlplane.billing import selectors as billing_selectors
from controlplane.billing.plans import plan_for
from controlplane.core import charts
from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Membership

from .forms import KeyCreateForm, LoginForm, SignupForm
from .session import (
    SESSION_ORGANIZATION,
    Console,
    actor_for,
    console_for,
    login_blocked,
    login_failed,
    login_succeeded,
    signup_allowed,
)

View = Callable[..., HttpResponse]
USAGE_DAYS = 30


def page(
    request: HttpRequest, template: str, context: dict[str, Any], status: int = 200
) -> TemplateResponse:
    response = TemplateResponse(request, f"console/{template}", context, status=status)
    response["Cache-Control"] = "no-store"  # pages hold tenant data (and new key values)
    return response


def refusal(request: HttpRequest, status: int, title: str, message: str) -> TemplateResponse:
    return page(request, "refusal.html", {"title": title, "message": message}, status=status)


def not_found(request: HttpRequest, what: str) -> TemplateResponse:
    return refusal(
        request, 404, "Not found", f"There is no {what} with this id in your organization."
    )


def member_required(view: View) -> View:
    """Logged in (else the login page) and a member of an organization (else a 403 page);
    the view gets the session's `Console` as its second argument."""

    @login_required(login_url="console:login")
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        console = console_for(request)
        if console is None:
            return refusal(
                request, 403, "No organization", "This account is not a member of any organization."
            )
        request.console = console  # type: ignore[attr-defined]  # for the base template
        return view(request, console, *args, **kwargs)

    return wrapped


# --- signing up and in ---------------------------------------------------------------


@never_cache
@require_http_methods(["GET", "POST"])
def signup_view(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST if request.method == "POST" else None)
    if request.method == "POST":
        if not signup_allowed(request):
            return page(
                request,
                "signup.html",
                {"form": form, "error": "Too many sign-ups from your address. Try again later."},
                status=429,
            )
        if form.is_valid():
            try:
                result = account_services.user_signup(
                    email=form.cleaned_data["email"],
                    password=form.cleaned_data["password"],
                    organization_name=form.cleaned_data["organization_name"],
                    kinds=["customer"],
                    actor=Actor.from_request(request),
                )
            except ApiError as exc:
                field = exc.param if exc.param in form.fields else None
                form.add_error(field, str(exc.detail))
            else:
                login(request, result.user, backend="django.contrib.auth.backends.ModelBackend")
                request.session[SESSION_ORGANIZATION] = result.organization.pk
                return redirect("console:overview")
        return page(request, "signup.html", {"form": form}, status=400)
    return page(request, "signup.html", {"form": form})


@never_cache
@require_http_methods(["GET", "POST"])
def login_view(request: HttpRequest) -> HttpResponse:
    form = LoginForm(request.POST if request.method == "POST" else None)
    if request.method != "POST":
        return page(request, "login.html", {"form": form, "next": request.GET.get("next", "")})
    nxt = request.POST.get("next", "")
    if not form.is_valid():
        return page(request, "login.html", {"form": form, "next": nxt}, status=400)
    email = form.cleaned_data["email"].lower()  # as sign-up stores it
    if login_blocked(email, request):
        error = "Too many failed log-ins for this email. Wait 15 minutes, then try again."
        return page(request, "login.html", {"form": form, "error": error, "next": nxt}, 429)
    user = authenticate(request, username=email, password=form.cleaned_data["password"])
    if user is None:
        login_failed(email, request)
        error = "Email or password is wrong."
        return page(request, "login.html", {"form": form, "error": error, "next": nxt}, 400)
    login_succeeded(email, request)
    login(request, user)
    # Only a path on this site (never another host): an open redirect would phish.
    if nxt.startswith("/console/") and not nxt.startswith("//"):
        return HttpResponseRedirect(nxt)
    return redirect("console:overview")


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return redirect("console:login")


# --- the organization ------------------------------------------------------------------


@never_cache
@member_required
def overview_view(request: HttpRequest, console: Console) -> HttpResponse:
    organization = console.membership.organization
    members = (
        Membership.objects.for_organization(organization)
        .select_related("user")
        .order_by("created_at", "id")
    )
    return page(
        request,
        "overview.html",
        {
            "nav": "overview",
            "organization": organization,
            "plan": plan_for(organization),
            "members": members,
        },
    )


# --- API keys ----------------------------------------------------------------------------


def _keys_page(
    request: HttpRequest, console: Console, form: KeyCreateForm, status: int = 200
) -> HttpResponse:
    keys = (
        APIKey.objects.for_organization(console.membership.organization_id)
        .select_related("member__user")
        .order_by("-created_at", "-id")
    )
    return page(
        request,
        "keys.html",
        {
            "nav": "keys",
            "keys": keys,
            "form": form,
            "can_write": console.can("organization.write"),
        },
        status=status,
    )


def _write_refused(request: HttpRequest, console: Console) -> HttpResponse | None:
    if console.can("organization.write"):
        return None
    return refusal(
        request,
        403,
        "Not allowed",
        f"Your role ({console.membership.role}) cannot manage API keys: "
        "ask an owner or an admin of your organization.",
    )


@never_cache
@member_required
@require_http_methods(["GET", "POST"])
def keys_view(request: HttpRequest, console: Console) -> HttpResponse:
    if request.method == "GET":
        return _keys_page(request, console, KeyCreateForm())
    if (refused := _write_refused(request, console)) is not None:
        return refused
    form = KeyCreateForm(request.POST)
    if not form.is_valid():
        return _keys_page(request, console, form, status=400)
    try:
        issued = account_services.api_key_create(
            principal=console.principal,
            name=form.cleaned_data["name"],
            scopes=[form.cleaned_data["scopes"]],
            member=console.membership,
            expires_at=None,
            actor=actor_for(request, console.membership.user),
        )
    except ApiError as exc:
        if exc.status_code == 403:
            return refusal(request, 403, "Not allowed", str(exc.detail))
        form.add_error(None, str(exc.detail))
        return _keys_page(request, console, form, status=exc.status_code)
    # The value is in this response only: it is never stored, so it cannot be shown again.
    return page(request, "key_value.html", {"api_key": issued.api_key, "value": issued.value})


def _owned_key(console: Console, key_id: str) -> APIKey | None:
    """The organization's key with this id, or None for every miss (foreign, unknown,
    impossible: PostgreSQL refuses NUL in text, and no id holds one), as `get_owned`."""
    if "\x00" in key_id:
        return None
    return (
        APIKey.objects.for_organization(console.membership.organization_id)
        .select_related("member__user")
        .filter(pk=key_id)
        .first()
    )


def _writable_key(request: HttpRequest, console: Console, key_id: str) -> APIKey | HttpResponse:
    """The organization's key `key_id` if the member may change keys; else the page to
    answer (404 for a key of another organization, 403 for a role without the scope)."""
    api_key = _owned_key(console, key_id)
    if api_key is None:
        return not_found(request, "API key")
    if (refused := _write_refused(request, console)) is not None:
        return refused
    return api_key


@member_required
@require_POST
def key_revoke_view(request: HttpRequest, console: Console, key_id: str) -> HttpResponse:
    api_key = _writable_key(request, console, key_id)
    if isinstance(api_key, HttpResponse):
        return api_key
    try:
        api_key = account_services.api_key_revoke(
            api_key=api_key,
            principal=console.principal,
            actor=actor_for(request, console.membership.user),
        )
    except ApiError as exc:
        return refusal(request, exc.status_code, "Not allowed", str(exc.detail))
    if request.headers.get("HX-Request") == "true":
        # htmx swaps the key's row in place.
        api_key = _owned_key(console, key_id) or api_key
        return page(request, "key_row.html", {"key": api_key, "can_write": True})
    return redirect("console:keys")


@never_cache
@member_required
@require_POST
def key_rotate_view(request: HttpRequest, console: Console, key_id: str) -> HttpResponse:
    api_key = _writable_key(request, console, key_id)
    if isinstance(api_key, HttpResponse):
        return api_key
    try:
        issued = account_services.api_key_rotate(
            api_key=api_key,
            grace_period_seconds=None,
            principal=console.principal,
            actor=actor_for(request, console.membership.user),
        )
    except ApiError as exc:
        return refusal(request, exc.status_code, "Cannot rotate", str(exc.detail))
    return page(
        request,
        "key_value.html",
        {"api_key": issued.api_key, "value": issued.value, "rotated_from": api_key},
    )


# --- usage and costs ---------------------------------------------------------------------


def _window(today: datetime) -> billing_selectors.Window:
    end = datetime.combine(today.date() + timedelta(days=1), time(), tzinfo=UTC)
    return billing_selectors.Window(
        start=end - timedelta(days=USAGE_DAYS),
        end=end,
        width=timedelta(days=1),
        groups=("model",),
    )


@never_cache
@member_required
def usage_view(request: HttpRequest, console: Console) -> HttpResponse:
    if not console.can("organization.read"):  # the API's usage endpoints need it too
        return refusal(request, 403, "Not allowed", "Your role cannot read usage.")
    organization = console.membership.organization
    window = _window(timezone.now().astimezone(UTC))
    usage = billing_selectors.usage_buckets(organization, window)
    costs = billing_selectors.cost_buckets(organization, window)
    days = [window.start + timedelta(days=i) for i in range(USAGE_DAYS)]
    tokens: dict[str, dict[datetime, int]] = defaultdict(dict)
    requests: dict[str, dict[datetime, int]] = defaultdict(dict)
    dollars: dict[str, dict[datetime, float]] = defaultdict(dict)
    for day, results in usage.items():
        for r in results:
            model = r["model"] or "(none)"
            tokens[model][day] = r["input_tokens"] + r["output_tokens"]
            requests[model][day] = r["num_model_requests"]
    for day, results in costs.items():
        for r in results:
            dollars[r["model"] or "(none)"][day] = r["amount"]["value"]
    models = sorted(set(tokens) | set(dollars))

    def series(values: dict[str, dict[datetime, Any]]) -> list[charts.Series]:
        return [
            charts.Series(
                m, [(i - USAGE_DAYS + 1, values[m].get(d, 0)) for i, d in enumerate(days)]
            )
            for m in models
        ]

    x_label = "days before today (0 = today, UTC)"
    rows: list[dict[str, Any]] = [
        {
            "day": d,
            "model": m,
            "tokens": tokens[m].get(d, 0),
            "requests": requests[m].get(d, 0),
            "cost": dollars[m].get(d, 0.0),
        }
        for d in reversed(days)
        for m in models
        if d in tokens[m] or d in dollars[m]
    ]
    context = {
        "nav": "usage",
        "start": window.start,
        "end": window.end - timedelta(days=1),
        "rows": rows,
        "total_tokens": sum(r["tokens"] for r in rows),
        "total_cost": sum(r["cost"] for r in rows),
        "tokens_chart": mark_safe(  # noqa: S308  (charts escapes every piece of data text)
            charts.line_chart(
                series(tokens),
                title="Tokens per day, by model",
                x_label=x_label,
                y_label="tokens",
                element_id="tokens-chart",
            )
        ),
        "cost_chart": mark_safe(  # noqa: S308
            charts.line_chart(
                series(dollars),
                title="Cost per day (USD), by model",
                x_label=x_label,
                y_label="USD",
                element_id="cost-chart",
            )
        ),
    }
    return page(request, "usage.html", context)
