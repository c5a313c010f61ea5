"""A custom engagement, run from the browser, from sign-up to a billed, delivered model.

A customer signs up and uploads training and validation data through the API (official
`openai` SDK); a staff member with the engagement permissions (not a superuser) logs in
to the admin, opens the staff dashboard, scopes an engagement with a milestone, moves it
to active, launches a fine-tuning job on the customer's files, watches the job page reach
`succeeded` without a reload, sees the loss chart, delivers the model (deployed) and
bills the milestone (billing it again from a stale tab creates nothing in localstripe).
The customer's key then lists the delivered model and chats with it, and reads the
engagement without its internal notes. Last, a launch over a second engagement's budget
is refused with a message.

One test: the stack's processes cache content types, which a transactional test's flush
renumbers, so a second test on the same processes would fail for that reason alone.
Everything runs on the real processes (see conftest.py); screenshots of each key page
land in tests/browser/artifacts/.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from django.contrib.admin.utils import unquote
from django.contrib.auth.models import Permission
from playwright.sync_api import Page, expect

from controlplane.accounts.models import User
from controlplane.billing.plans import plans_ensure_defaults
from controlplane.jobs.models import Job
from controlplane.payments import gateway
from controlplane.tenancy.models import Organization
from tests.browser.helpers import Browse, Stack, wait_for
from tests.support.engagements import staff_member
from tests.support.jobs import TINY_LLAMA, chat_rows, register_tiny_llama
from tests.support.localstripe import LocalStripe
from tests.support.people import PASSWORD

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CUSTOMER_PASSWORD = "a long customer passphrase"
TRAINING_ROWS = 24
MILESTONE_AMOUNT = Decimal("1500.00")
INTERNAL_NOTES = "Margin is thin on this one: staff eyes only."
#: A tiny model on two shared cores: seconds of training, well within this.
JOB_TIMEOUT_MS = 240_000


@dataclass
class Customer:
    organization: Organization
    sdk: openai.OpenAI


def customer_signs_up(stack: Stack, email: str, name: str) -> Customer:
    """`POST /v1/signup`, as a new customer does; the key it returns drives the SDK."""
    answer = httpx.post(
        stack.url + "/v1/signup",
        json={"email": email, "password": CUSTOMER_PASSWORD, "organization_name": name},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    key = str(answer.json()["api_key"]["value"])
    sdk = openai.OpenAI(api_key=key, base_url=stack.url + "/v1", max_retries=0, timeout=180)
    me = sdk.get("/me", cast_to=dict)
    return Customer(Organization.objects.get(pk=me["organization"]["id"]), sdk)


def uploaded(customer: Customer, name: str, rows: int) -> str:
    """A fine-tuning file of the customer's, uploaded with `client.files.create`, validated."""
    data = io.BytesIO(chat_rows(rows))
    file = customer.sdk.files.create(file=(name, data), purpose="fine-tune")
    wait_for(
        lambda: customer.sdk.files.retrieve(file.id).status == "processed",
        f"{name}'s validation",
        timeout=60,
    )
    return file.id


def engagement_staff(email: str) -> User:
    """Staff (not a superuser) with every engagement permission, and the jobs' pages."""
    user = staff_member(email)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="jobs"))
    return user


def engagement_created(
    browse: Browse, customer: Customer, owner: User, title: str, *, budget: tuple[str, str, str]
) -> str:
    """Fill the engagement add form with one milestone; the new engagement's change URL, as
    the admin links to it (the pk `quote`d: `_` is `_5F`), the way staff reach it."""
    page = browse.page
    browse.goto("/admin/engagements/engagement/add/")
    page.select_option("select[name=organization]", customer.organization.pk)
    page.fill("[name=title]", title)
    page.fill("[name=scope]", "Fine-tune a support assistant on the customer's tickets.")
    page.select_option("select[name=owner]", owner.pk)
    tokens, gpu_seconds, amount = budget
    page.fill("[name=budget_tokens]", tokens)
    page.fill("[name=budget_gpu_seconds]", gpu_seconds)
    page.fill("[name=budget_amount]", amount)
    if page.locator("[name=internal_notes]").count():
        page.fill("[name=internal_notes]", INTERNAL_NOTES)
    page.fill("[name=milestones-0-title]", "Fine-tuned model delivered")
    page.fill("[name=milestones-0-due_date]", "2030-01-31")
    page.fill("[name=milestones-0-amount]", str(MILESTONE_AMOUNT))
    page.fill("[name=milestones-0-acceptance_notes]", "Answers order questions.")
    browse.shot(f"engagement-add-{slug(title)}")
    page.click("input[name=_save]")
    browse.success()
    # Django admin's "was added successfully" message links to the new object.
    href = page.locator(".messagelist .success a").first.get_attribute("href")
    assert href is not None
    assert re.search(r"/admin/engagements/engagement/[^/]+/change/$", href), href
    return href


def moved_to_active(browse: Browse, change_url: str) -> None:
    """lead → scoping → proposal → active, one transition button at a time."""
    browse.goto(change_url)
    expect(
        browse.page.locator('button[name="transition"]').first,
        f"no pipeline buttons on {change_url}, the page the admin's own links lead to",
    ).to_be_visible()
    for status in ("scoping", "proposal", "active"):
        browse.page.click(f'button[name="transition"][value="{status}"]')
        assert status in browse.success().lower()


def launch(browse: Browse, change_url: str, files: tuple[str, str], suffix: str) -> None:
    """Fill and send the engagement's launch form for a fine-tuning job."""
    browse.goto(change_url)
    page = browse.page
    page.click("a#launch-job")
    expect(page).to_have_url(re.compile(r"/launch/$"))
    page.select_option("select[name=kind]", "fine_tuning")
    page.fill("[name=model]", TINY_LLAMA)
    page.fill("[name=training_file]", files[0])
    page.fill("[name=validation_file]", files[1])
    page.fill("[name=suffix]", suffix)
    page.fill("[name=n_epochs]", "2")
    browse.shot(f"launch-{suffix}")
    page.click("button#launch")


def engagement_pk(change_url: str) -> str:
    return unquote(change_url.rstrip("/").split("/")[-2])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def watch_status(page: Page) -> None:
    """Record every text `#job-status` shows, and mark the document to detect a reload."""
    page.evaluate(
        """() => {
            const el = document.querySelector('#job-status');
            window.__statuses = [el.textContent.trim()];
            new MutationObserver(() => window.__statuses.push(el.textContent.trim()))
                .observe(el, {childList: true, characterData: true, subtree: true});
            window.__sameDocument = true;
        }"""
    )


def stripe_invoices(customer_id: str) -> list[Any]:
    """The customer's invoices as localstripe holds them (through the platform's gateway)."""
    return list(gateway.invoices_of(customer_id))


def test_staff_run_an_engagement_from_the_browser_and_the_customer_gets_the_model(
    stack: Stack, browse: Browse, stripe_settings: LocalStripe
) -> None:
    plans_ensure_defaults()
    register_tiny_llama()
    page = browse.page

    # The customer: sign-up, training and validation data, a card on file (localstripe).
    acme = customer_signs_up(stack, "alice@acme.test", "Acme")
    files = uploaded(acme, "support.jsonl", TRAINING_ROWS), uploaded(acme, "held-out.jsonl", 6)
    stripe_customer = gateway.customer_for(acme.organization)
    stripe_settings.card(stripe_customer)
    stripe_settings.allow_invoices(stripe_customer)  # localstripe invoices need a subscription
    before_billing = len(stripe_invoices(stripe_customer))
    assert TINY_LLAMA in {m.id for m in acme.sdk.models.list().data}

    # Staff: log in, the dashboard at a glance.
    sam = engagement_staff("sam@atelier.test")
    browse.login(sam.email, PASSWORD)
    browse.shot("admin-index")
    page.click('a[href="/admin/dashboard/"]')
    for section in ("#jobs-by-queue", "#failed-jobs", "#inference-last-hour", "#revenue-mtd"):
        expect(page.locator(section)).to_be_visible()
    browse.shot("staff-dashboard")

    # Scope the engagement, move it to active, launch a fine-tuning job for the customer.
    change_url = engagement_created(
        browse, acme, sam, "Acme support assistant", budget=("10000000", "100000", "5000.00")
    )
    moved_to_active(browse, change_url)
    browse.shot("engagement-active")
    launch(browse, change_url, files, "acme-support")
    browse.success()
    browse.shot("engagement-job-launched")
    job = Job.objects.dangerously_unscoped().get(engagement_id=engagement_pk(change_url))
    assert job.organization_id == acme.organization.pk

    # The job page follows the job to `succeeded` without a reload.
    browse.goto(f"/admin/jobs/job/{job.pk}/change/")
    watch_status(page)
    # Just launched, so not finished yet: staff may cancel it from here.
    expect(page.locator('button[name="job_action"][value="cancel"]')).to_have_count(1)
    browse.shot("job-running")
    expect(page.locator("#job-status")).to_have_text(
        re.compile(r"succeeded", re.I), timeout=JOB_TIMEOUT_MS
    )
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    statuses = page.evaluate("window.__statuses")
    assert len(set(statuses)) > 1, f"#job-status never changed in place: {statuses}"
    job.refresh_from_db()
    model_id = job.fine_tuned_model
    assert model_id
    # An engagement's model stays hidden from the customer until it is delivered.
    assert model_id not in {m.id for m in acme.sdk.models.list().data}

    browse.goto(f"/admin/jobs/job/{job.pk}/change/")
    series = page.locator("svg#loss-chart g.series")
    expect(series).to_have_count(2)  # training and validation loss
    for i in range(2):
        assert int(series.nth(i).get_attribute("data-points") or 0) > 0, series.nth(i).inner_html()
    browse.shot("job-succeeded-loss-chart")

    # Deliver the model into the customer's organization, deployed.
    browse.goto(change_url)
    page.click("a#deliver-model")
    expect(page).to_have_url(re.compile(r"/deliver/$"))
    page.select_option("select[name=model]", model_id)
    page.check("input[name=deploy]")
    browse.shot("deliver-form")
    page.click("button#deliver")
    browse.success()
    browse.shot("engagement-delivered")

    # Bill the milestone; a stale second tab billing it again creates nothing new.
    stale = page.context.new_page()
    stale.goto(browse.base_url + change_url)
    bill = page.locator('table#milestones button[name="bill"]').first
    milestone = bill.get_attribute("value")
    bill.click()
    browse.success()
    browse.shot("engagement-milestone-billed")
    billed = f'table#milestones button[name="bill"][value="{milestone}"]'
    expect(page.locator(billed)).to_have_count(0)
    after_first = stripe_invoices(stripe_customer)
    assert len(after_first) == before_billing + 1, after_first
    assert any(inv["amount_due"] == int(MILESTONE_AMOUNT * 100) for inv in after_first), after_first

    stale.click(billed)
    expect(stale.locator(".messagelist .error")).to_be_visible()
    browse.shot("engagement-billed-twice", stale)
    stale.close()
    assert len(stripe_invoices(stripe_customer)) == before_billing + 1

    # The customer's key: the delivered model is listed and answers.
    assert model_id in {m.id for m in acme.sdk.models.list().data}
    reply = acme.sdk.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "where is my order"}], max_tokens=8
    )
    assert reply.model == model_id
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.choices[0].message.role == "assistant"
    # And the engagement, read-only: delivered model and billed milestone, no internal notes.
    seen = acme.sdk.get(f"/engagements/{engagement_pk(change_url)}", cast_to=dict)
    assert [m["id"] for m in seen["delivered_models"]] == [model_id]
    assert [m["status"] for m in seen["milestones"]] == ["billed"]
    assert INTERNAL_NOTES not in json.dumps(seen)
    assert sam.email not in json.dumps(seen)

    # A second engagement on a shoestring: the launch is refused, with a message.
    shoestring = engagement_created(
        browse, acme, sam, "Acme pilot on a shoestring", budget=("1", "1", "0.01")
    )
    moved_to_active(browse, shoestring)
    launch(browse, shoestring, files, "acme-pilot")
    assert "budget" in browse.error().lower()
    browse.shot("launch-over-budget")
    assert not Job.objects.dangerously_unscoped().filter(engagement_id=engagement_pk(shoestring))

    browse.assert_stayed_local()
    assert stack.tracebacks() == {}, "a process logged a traceback: see its log"
