"""``mmwatchd gallery``: the page is written from real sidecars and driven in a real headless Chromium.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``)
and the ``selenium`` package; without them they are skipped, saying so. Selenium Manager is never asked to download
a driver: the system one is passed in. Each run keeps a screenshot in its temporary folder (and copies it to
``$MMWATCHD_SCREENSHOT_DIR`` when that is set, which is how ``docs/gallery.png`` is made).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from described import config, describe
from fakevlm import FakeVLM
from media import make_jpeg, make_named_text, make_truncated, make_video

from mmwatchd import gallery
from mmwatchd.cli import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
XSS_NAME = "<img src=x onerror=alert(1)>.jpg"
XSS_CAPTION = '<script>alert("caption")</script>'


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six files a rule takes, as a library has them after a scan: four described (one a video, one with markup in
    its name and caption), one failed, one not yet described; and a text file no rule takes. Returns the config."""
    folder = tmp_path_factory.mktemp("library")
    with FakeVLM() as fake_vlm:
        cfg = config(folder, fake_vlm)
        inbox = folder / "inbox"
        replies = {
            make_jpeg(inbox / "IMG_0001.jpg", (800, 600), seed=1, taken="2021:07:14 18:30:00"):
                ("A brown dog runs along the beach at sunset.", ["dog", "beach", "sunset"]),
            make_jpeg(inbox / "trip" / "IMG_0002.jpg", (600, 800), seed=2, taken="2023:01:02 09:00:00"):
                ("A cat asleep on a red sofa.", ["cat", "indoor"]),
            make_jpeg(inbox / XSS_NAME, (640, 480), seed=3, taken="2022:03:03 12:00:00"):
                (XSS_CAPTION, ["<b>bold</b>", "cat"]),
            make_video(inbox / "clip.mp4", (160, 120), frames=24, fps=6, detail=True):
                ("Coloured shapes drift across the frame.", ["animation"]),
        }  # fmt: skip
        broken = make_truncated(make_jpeg(folder / "whole.jpg", (256, 256), seed=5), inbox / "broken.jpg")
        describe(cfg, fake_vlm, replies, failing=[broken])
    make_jpeg(inbox / "trip" / "new.jpg", (640, 480), seed=6)
    make_named_text(inbox / "notes.txt")
    return cfg


def build(cfg: Path, out: Path, *paths: Path) -> str:
    assert main(["gallery", "-c", str(cfg), "-o", str(out), "--log-level", "error", *map(str, paths)]) == 0
    return out.read_text(encoding="utf-8")


def page_data(html: str) -> dict[str, Any]:
    start = html.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return json.loads(html[start : html.index("</script>", start)])


class TestPage:
    def test_every_file_a_rule_takes_is_a_card(self, library: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        html = build(library, tmp_path / "review.html")
        out = capsys.readouterr().out
        assert out.endswith(": 6 files (4 described, 1 failed, 1 not yet described); thumbnails: 5 made, 0 reused, "
                            "1 without a preview\n")  # fmt: skip
        cards = {c["path"]: c for c in page_data(html)["cards"]}
        assert sorted(cards) == sorted(["IMG_0001.jpg", "trip/IMG_0002.jpg", XSS_NAME, "clip.mp4", "broken.jpg",
                                        "trip/new.jpg"])  # fmt: skip
        dog = cards["IMG_0001.jpg"]
        assert (dog["status"], dog["rule"], dog["model"], dog["date"]) == ("ok", "photos", "fake-vlm",
                                                                           "2021-07-14 18:30:00")  # fmt: skip
        assert dog["caption"] == "A brown dog runs along the beach at sunset."
        assert dog["tags"] == ["dog", "beach", "sunset"]
        up = f"../{library.parent.name}/inbox/IMG_0001.jpg"  # library0, or library1 beside another module's
        assert (dog["href"], dog["sidecar"]) == (up, up + ".json")
        assert cards["broken.jpg"]["status"] == "error" and "truncated JPEG" in cards["broken.jpg"]["error"]
        assert cards["broken.jpg"]["thumbs"] == [] and "truncated" in cards["broken.jpg"]["thumb_error"]
        assert cards["trip/new.jpg"]["status"] == "new" and cards["trip/new.jpg"]["sidecar"] is None
        assert len(cards["clip.mp4"]["thumbs"]) == 4  # a strip of frames
        assert cards[XSS_NAME]["href"].endswith("/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.jpg")
        files = tmp_path / "review_files"
        for card in cards.values():
            for thumb in card["thumbs"]:
                with open(tmp_path / thumb, "rb") as fh:
                    assert fh.read(3) == b"\xff\xd8\xff"  # our encoder's JPEGs
        assert sorted(p.name for p in files.iterdir() if p.suffix == ".jpg") == sorted(
            Path(t).name for c in cards.values() for t in c["thumbs"]
        )

    def test_nothing_from_a_sidecar_is_markup(self, library: Path, tmp_path: Path) -> None:
        html = build(library, tmp_path / "review.html")
        assert XSS_CAPTION not in html and "<img src=x" not in html and "<b>bold" not in html
        start = html.index('type="application/json">')
        block = html[start + len('type="application/json">') : html.index("</script>", start)]
        assert "<" not in block and ">" not in block and "&" not in block
        text = gallery.script_json({"a": "</script><!-- & \u2028\u2029 \udcff"})
        assert not set("<>&\u2028\u2029") & set(text)
        assert json.loads(text) == {"a": "</script><!-- & \u2028\u2029 \udcff"}

    def test_thumbnails_are_reused_and_cleaned_up(self, library: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        out = tmp_path / "review.html"
        build(library, out)
        capsys.readouterr()
        build(library, out)
        assert "thumbnails: 0 made, 5 reused, 1 without a preview" in capsys.readouterr().out
        # Only the folder given: the other cards' thumbnails are removed
        build(library, out, library.parent / "inbox" / "trip")
        assert "2 files (1 described, 0 failed, 1 not yet described); thumbnails: 0 made, 2 reused" in (
            capsys.readouterr().out
        )
        assert len([p for p in (tmp_path / "review_files").iterdir() if p.suffix == ".jpg"]) == 2

    def test_a_file_name_that_is_not_utf8(self, library: Path, tmp_path: Path) -> None:
        odd = tmp_path / "odd"
        odd.mkdir()
        name = os.fsdecode(b"caf\xe9 <x>.jpg")  # Latin-1, as old cameras and Windows shares write them
        make_jpeg(odd / name)
        [card] = page_data(build(library, tmp_path / "review.html", odd))["cards"]
        assert card["path"] == str(odd / "caf\ufffd <x>.jpg") and card["status"] == "new"
        assert card["href"] == "odd/caf%E9%20%3Cx%3E.jpg" and len(card["thumbs"]) == 1

    def test_a_page_it_did_not_write_is_left_alone(self, library: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        out = tmp_path / "review.html"
        out.write_text("<html>my own page</html>")
        assert main(["gallery", "-c", str(library), "-o", str(out)]) == 1
        assert "was not written by mmwatchd gallery" in capsys.readouterr().err
        assert out.read_text() == "<html>my own page</html>"
        assert main(["gallery", "-c", str(library), "-o", str(tmp_path), "--log-level", "error"]) == 1
        assert "is a folder" in capsys.readouterr().err
        assert main(["gallery", "-c", str(library), "-o", str(out), str(tmp_path / "nope")]) == 2
        assert "nope: no such file or folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    for need in (CHROMIUM, CHROMEDRIVER):
        if not need.exists():
            pytest.skip(f"{need} is missing (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mmwatchd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1040", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, predicate: Any, timeout: float = 10.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate())


def open_page(driver: Any, page: Path) -> None:
    driver.get(page.as_uri())
    wait_for(driver, lambda: driver.execute_script("return document.readyState") == "complete")
    driver.get_log("browser")  # what came before this page


def shown(driver: Any) -> list[str]:
    """The names on the cards in the DOM, in order (read in one script: the page may be re-rendering)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('article.card .name')].map((e) => e.textContent)"
    )


def problems(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def screenshot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    if os.environ.get("MMWATCHD_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["MMWATCHD_SCREENSHOT_DIR"]) / path.name)


class TestInBrowser:
    def test_the_page_in_a_browser(self, browser: Any, library: Path, tmp_path: Path) -> None:
        from selenium.common.exceptions import NoAlertPresentException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        page = tmp_path / "review.html"
        build(library, page)
        open_page(browser, page)
        wait_for(browser, lambda: len(shown(browser)) == 6)
        # every thumbnail loads, from file://, under the page's Content-Security-Policy
        wait_for(browser, lambda: browser.execute_script(
            "return [...document.images].every((i) => i.complete && i.naturalWidth > 0)"))  # fmt: skip
        # 4 photos, 4 frames of the video; the broken file has none
        assert browser.execute_script("return document.images.length") == 4 + 4
        assert problems(browser) == []
        screenshot(browser, tmp_path / "gallery.png")
        assert (tmp_path / "gallery.png").stat().st_size > 10_000
        # newest first by date taken; files without one (the video, the failed and the new file) by their mtime
        assert shown(browser)[3:] == ["trip/IMG_0002.jpg", XSS_NAME, "IMG_0001.jpg"]

        # markup from a sidecar and a file name is shown as text: no alert, no injected element
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert  # noqa: B018
        assert browser.find_elements(By.CSS_SELECTOR, "img[src='x'], main script, .card b") == []
        assert XSS_CAPTION in [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".caption")]
        assert XSS_NAME in shown(browser)
        assert "<b>bold</b>" in [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".tag")]

        search = browser.find_element(By.ID, "q")
        search.send_keys("sofa")
        wait_for(browser, lambda: shown(browser) == ["trip/IMG_0002.jpg"])
        assert browser.find_element(By.ID, "count").text == "1 of 6 files"
        search.clear()
        search.send_keys("trip")  # a folder name
        wait_for(browser, lambda: sorted(shown(browser)) == ["trip/IMG_0002.jpg", "trip/new.jpg"])
        search.clear()
        search.send_keys("cat")  # a tag of two files
        wait_for(browser, lambda: sorted(shown(browser)) == sorted([XSS_NAME, "trip/IMG_0002.jpg"]))
        search.send_keys(" zebra")
        wait_for(browser, lambda: shown(browser) == [])
        assert browser.find_element(By.ID, "empty").is_displayed()
        search.clear()
        search.send_keys(" ")
        wait_for(browser, lambda: len(shown(browser)) == 6)

        status = Select(browser.find_element(By.ID, "status"))
        status.select_by_value("new")
        assert shown(browser) == ["trip/new.jpg"]
        [badge] = browser.find_elements(By.CSS_SELECTOR, ".badge")
        assert badge.text.lower() == "not yet described"
        status.select_by_value("error")
        assert shown(browser) == ["broken.jpg"]
        assert "truncated JPEG" in browser.find_element(By.CSS_SELECTOR, ".card p.error").text
        status.select_by_value("")

        Select(browser.find_element(By.ID, "tag")).select_by_value("sunset")
        assert shown(browser) == ["IMG_0001.jpg"]
        Select(browser.find_element(By.ID, "tag")).select_by_value("")
        Select(browser.find_element(By.ID, "sort")).select_by_value("path")
        assert shown(browser) == [
            XSS_NAME,
            "broken.jpg",
            "clip.mp4",
            "IMG_0001.jpg",
            "trip/IMG_0002.jpg",
            "trip/new.jpg",
        ]  # by full path, ignoring case

        # a video shows a strip of its frames; links lead to the original and its sidecar
        strip = browser.find_elements(By.CSS_SELECTOR, "article.card .thumb.strip img")
        assert len(strip) == 4
        inbox = library.parent / "inbox"
        links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".card .meta a")
                 if a.text in ("original", "sidecar")}  # fmt: skip
        hrefs = [unquote(urlsplit(a.get_attribute("href")).path)
                 for a in browser.find_elements(By.CSS_SELECTOR, ".card .meta a")]  # fmt: skip
        assert links and str(inbox / XSS_NAME) in hrefs and str(inbox / (XSS_NAME + ".json")) in hrefs
        assert str(inbox / "trip" / "new.jpg") in hrefs and str(inbox / "trip" / "new.jpg.json") not in hrefs
        assert problems(browser) == []

    def test_ten_thousand_files_render_a_page_at_a_time(self, tmp_path: Path, browser: Any) -> None:
        from selenium.webdriver.common.by import By

        mtime = int(datetime(2024, 1, 1).timestamp() * 1e9)
        cards = [
            gallery.Card(path=Path(f"/photos/{i // 100:03d}/IMG_{i:05d}.jpg"), media_kind="image", size=1,
                         mtime_ns=mtime + i * 10**9, status=("ok", "error", "new")[i % 3], root=Path("/photos"),
                         doc={"rule": "photos", "model": "m",
                              "response": {"text": f"Photo number {i}.", "data": None}} if i % 3 == 0 else None)
            for i in range(10_000)
        ]  # fmt: skip
        page = tmp_path / "big.html"
        page.write_text(gallery.render_page(cards, tmp_path, title="10,000 files"), encoding="utf-8")
        open_page(browser, page)
        wait_for(browser, lambda: browser.find_element(By.ID, "count").text == "10000 files")
        rendered = len(browser.find_elements(By.CSS_SELECTOR, "article.card"))
        assert gallery.PAGE_SIZE <= rendered <= 3 * gallery.PAGE_SIZE  # a page or two, not 10,000 cards
        browser.find_element(By.ID, "q").send_keys("IMG_09999")
        wait_for(browser, lambda: shown(browser) == ["099/IMG_09999.jpg"])
        assert browser.find_element(By.ID, "count").text == "1 of 10000 files"
        browser.find_element(By.ID, "q").clear()
        browser.find_element(By.ID, "q").send_keys(" ")
        wait_for(browser, lambda: browser.find_element(By.ID, "count").text == "10000 files")
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        wait_for(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "article.card")) > rendered)
        assert problems(browser) == []
