"""Browser tests: a real headless Chromium (Playwright's sync API) against pytest-django's
live server, logged in through the admin's own login form.

Every page a test opens is watched: a JavaScript dialog, a Content-Security-Policy
violation or a document served without the CSP header fails the test (``ConsoleBrowser``).
Without a Chromium the browser tests are skipped with the way to get one; CI sets
``SAGAS_REQUIRE_BROWSER=1`` so that a missing browser fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import console_group
from tests.engine import conftest as engine

VIEWPORT = {"width": 1400, "height": 900}
PASSWORD = "pw-console-e2e-123"
SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
HOW_TO_GET_ONE = (
    "install one: `apt-get install chromium` (Debian/Ubuntu) or "
    "`.venv/bin/playwright install chromium`"
)

# Real forking workers, as the engine tests start them (Postgres only).
workers = engine.workers


def _no_browser(reason: str) -> NoReturn:
    """Skip, or fail when CI requires the browser tests to run."""
    message = f"browser tests need Chromium: {reason}; {HOW_TO_GET_ONE}"
    if os.environ.get("SAGAS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (SAGAS_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(message)


def find_chromium(playwright: Any) -> str | None:
    """Playwright's own Chromium if it is installed (None: launch it as is), else a
    system one; raises LookupError when there is none."""
    own = playwright.chromium.executable_path
    if own and Path(own).exists():
        return None
    for name in SYSTEM_BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise LookupError(f"neither Playwright's Chromium nor any of {', '.join(SYSTEM_BROWSERS)}")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the session."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    # Playwright's sync API runs an event loop in this thread; Django's ORM refuses to run
    # beside one unless told it is safe (it is: the loop is Playwright's, not the ORM's).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    driver = sync_playwright().start()
    try:
        try:
            executable = find_chromium(driver)
            browser = driver.chromium.launch(executable_path=executable, headless=True)
        except (LookupError, Error) as exc:
            _no_browser(str(exc).splitlines()[0])
        yield browser
        browser.close()
    finally:
        driver.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@dataclass
class ConsoleBrowser:
    """One browser tab on the live server, and what it saw go wrong."""

    page: Any
    base_url: str
    dialogs: list[str] = field(default_factory=list)
    csp_reports: list[str] = field(default_factory=list)
    documents_without_csp: list[str] = field(default_factory=list)
    navigations: int = 0

    def url(self, path: str) -> str:
        return self.base_url + path

    def goto(self, path: str) -> Any:
        response = self.page.goto(self.url(path))
        assert response is not None and response.ok, f"{path}: {response and response.status}"
        return response

    def login(self, user: Any, password: str = PASSWORD, then: str = "/admin/") -> None:
        """Through the admin's login form, as a person would."""
        self.goto(f"/admin/login/?next={then}")
        self.page.fill("#id_username", user.get_username())
        self.page.fill("#id_password", password)
        with self.page.expect_navigation():
            self.page.click("#login-form input[type=submit]")
        assert "/admin/login/" not in self.page.url, self.messages() or "login refused"

    def messages(self) -> str:
        """The admin's messages on the current page."""
        return " ".join(self.page.locator("ul.messagelist li").all_inner_texts())

    def csrf_token(self) -> str:
        """The token every admin page carries (the logout form's)."""
        return str(self.page.locator("input[name=csrfmiddlewaretoken]").first.input_value())

    def watch(self) -> None:
        page = self.page
        page.on("dialog", self._on_dialog)
        page.on("console", self._on_console)
        page.on("response", self._on_response)
        page.on("framenavigated", self._on_navigation)
        page.expose_function("reportCspViolation", self._on_csp_violation)
        page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => window.reportCspViolation("
            "`${e.violatedDirective} blocked ${e.blockedURI} at ${e.sourceFile}:${e.lineNumber}`"
            "));"
        )

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message} on {self.page.url}")
        dialog.dismiss()

    def _on_csp_violation(self, report: str) -> None:
        self.csp_reports.append(f"{report} on {self.page.url}")

    def _on_console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.csp_reports.append(f"{message.text} on {self.page.url}")

    def _on_response(self, response: Any) -> None:
        request = response.request
        if request.resource_type != "document" or not response.url.startswith(self.base_url):
            return
        if response.status < 300 and "content-security-policy" not in response.headers:
            self.documents_without_csp.append(response.url)

    def _on_navigation(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1

    def assert_clean(self) -> None:
        assert not self.dialogs, f"a page opened a dialog (script ran): {self.dialogs}"
        assert not self.csp_reports, f"Content-Security-Policy violations: {self.csp_reports}"
        assert not self.documents_without_csp, (
            f"pages served without a Content-Security-Policy header: {self.documents_without_csp}"
        )


@pytest.fixture
def console(chromium: Any, live_server: Any) -> Iterator[ConsoleBrowser]:
    """A fresh browser context (no cookies) at 1400x900; checked when the test ends."""
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(15_000)
    browser = ConsoleBrowser(context.new_page(), live_server.url)
    browser.watch()
    yield browser
    try:
        browser.assert_clean()
    finally:
        context.close()


def console_user(django_user_model: Any, username: str, group_name: str) -> Any:
    """A staff user whose only permissions come from one of the console's groups."""
    user = django_user_model.objects.create_user(username, password=PASSWORD, is_staff=True)
    user.groups.add(console_group(group_name))
    return user


@pytest.fixture
def operator_user(django_user_model: Any) -> Any:
    return console_user(django_user_model, "olivia-oncall", "Saga operators")


@pytest.fixture
def viewer_user(django_user_model: Any) -> Any:
    return console_user(django_user_model, "victor-viewer", "Saga viewers")
