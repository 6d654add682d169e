"""Invitations that arrive as whole mails: MIME, base64, quoted-printable, HTML, nesting, size.

Every mail here is built with the standard library's ``email`` package, the way mail clients and
scripts build them.  Before ``meshd.trust.mail`` existed, ``parse`` saw only the raw text, so a
base64 body, an HTML body cut by tags, or a base64 part inside a multipart gave ``not-found``.
"""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.mime.message import MIMEMessage
from email.mime.application import MIMEApplication

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.errors import TokenError
from meshd.trust import mail
from meshd.trust.tokens import MAX_INPUT, Address, Invitation, armor, encode, parse

from tests.unit.test_tokens import RICH, invitations, sample

OTHER = sample(addrs=(Address("203.0.113.9", 9),), name_hint="other")
PROSE = "Hi Alice,\n\nhere is the invitation to our mesh \u2014 it expires Friday:\n\n"
GREETING = ("Привет! Вот приглашение в нашу сеть — скопируйте его целиком, пожалуйста,"
            " и спасибо большое\n\n")
SIGN = "\nJoin with: meshd join < this-mail.eml\n\n-- \nBob\n"


def mail_with(body: str, **kw: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bob@example.org", "alice@example.org", "meshd"
    msg.set_content(body, **kw)  # type: ignore[arg-type]
    return msg


def reason_of(data: str | bytes) -> tuple[str, str]:
    with pytest.raises(TokenError) as info:
        parse(data)
    return info.value.reason, info.value.message


# --- what the issue reported -----------------------------------------------------------------


def test_the_email_package_writes_utf8_bodies_as_base64_and_they_parse() -> None:
    # MIMEText with charset utf-8 always writes base64 (email.charset: BASE64 for utf-8).
    old_api = MIMEText(PROSE + armor(RICH) + SIGN, "plain", "utf-8")
    # EmailMessage.set_content picks 8bit for short lines, else the shorter of QP and base64:
    # base64 as soon as a long line is mostly non-ASCII, as a greeting in Cyrillic is.
    new_api = mail_with(GREETING + armor(RICH) + SIGN)
    for msg in (old_api, new_api):
        assert msg["Content-Transfer-Encoding"] == "base64"
        assert "MESHD1" not in msg.as_string()
        assert parse(msg.as_bytes()) == RICH
        assert parse(msg.as_string()) == RICH  # the mail as text, as the control socket gets it
    short_lines = mail_with(PROSE + armor(RICH) + SIGN)
    assert short_lines["Content-Transfer-Encoding"] == "8bit"  # this one parsed before too
    assert parse(bytes(short_lines)) == RICH


def test_multipart_alternative_prefers_text_plain() -> None:
    alt = MIMEMultipart("alternative")
    alt["Subject"] = "meshd"
    # The HTML part comes first and carries another token: the text/plain one wins.
    alt.attach(MIMEText(f"<p>{encode(OTHER)}</p>", "html", "utf-8"))
    alt.attach(MIMEText(PROSE + armor(RICH) + SIGN, "plain", "utf-8"))
    assert parse(alt.as_bytes()) == RICH


def test_html_only_mail_with_tags_and_entities() -> None:
    token = encode(RICH)
    groups = token.split("-")
    # Lines broken with <br>, a <wbr> and a soft hyphen inside groups, dashes as entities.
    cut = [g if i == 0 else f"{g[:2]}<wbr>{g[2:]}" if i % 3 == 0 else f"{g[:3]}&shy;{g[3:]}"
           for i, g in enumerate(groups)]
    body = "&#45;".join(cut[:8]) + "&#x2D;<br>\n" + "&hyphen;".join(cut[8:])
    html = (f"<html><head><style>p {{ color: red }}</style></head><body><p>Hi Alice,</p>"
            f"<p>the token &mdash; copy it whole:</p><p><code>{body}</code></p>"
            "<p>Bob &amp; the team</p></body></html>")
    for msg in (MIMEText(html, "html", "utf-8"), MIMEText(html, "html", "us-ascii")):
        assert parse(msg.as_bytes()) == RICH, msg["Content-Transfer-Encoding"]
    # Read as text, the entity right after MESHD1 hides the token: the HTML reading finds it.
    as_text = MIMEText(html, "html", "us-ascii").as_bytes().replace(b"text/html", b"text/x")
    assert reason_of(as_text)[0] == "not-found"


def test_quoted_printable_soft_breaks_inside_the_token() -> None:
    line = "Token: " + encode(RICH) + " \u2014 keep it secret."
    msg = mail_with(PROSE + line + SIGN, cte="quoted-printable")
    raw = msg.as_string()
    assert "=\n" in raw and encode(RICH) not in raw  # the encoder split the token
    assert parse(raw) == RICH
    assert parse(msg.as_bytes()) == RICH


def test_base64_reply_with_quoted_and_rewrapped_token() -> None:
    token = encode(RICH)
    wrapped = [token[i : i + 37] for i in range(0, len(token), 37)]  # a client rewrapped it
    quoted = "".join(f"> > {line}\n" for line in ["Hi!", *wrapped, "Bob"])
    msg = mail_with("Thanks \u2014 joining now.\n\nOn Monday Bob wrote:\n" + quoted, cte="base64")
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert parse(bytes(msg)) == RICH


def test_forwarded_as_attachment_inside_mixed_with_a_binary_attachment() -> None:
    inner = MIMEText(PROSE + armor(RICH) + SIGN, "plain", "utf-8")
    outer = MIMEMultipart("mixed")
    outer["Subject"] = "Fwd: meshd"
    outer.attach(MIMEText("See the forwarded mail \u2014 thanks.", "plain", "utf-8"))
    outer.attach(MIMEApplication(bytes(range(256)) * 40, "octet-stream"))
    outer.attach(MIMEMessage(inner))
    assert parse(outer.as_bytes()) == RICH


def test_eight_bit_latin1_body() -> None:
    body = ("Grüße aus Zürich, hier ist die Einladung:\n" + armor(RICH)).encode("latin-1")
    raw = b"Subject: x\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n" \
          b"Content-Transfer-Encoding: 8bit\n\n" + body
    assert parse(raw) == RICH
    assert mail.read(raw).plain[0].startswith("Grüße")


def test_utf16_part_is_read_with_its_charset() -> None:
    part = MIMEText(PROSE + armor(RICH), "plain", "utf-16")
    assert parse(part.as_bytes()) == RICH


# --- plain bodies behave as before -----------------------------------------------------------


def test_plain_bodies_are_not_read_as_mail() -> None:
    body = "Note: the token follows\n\n" + armor(RICH)  # the first line looks like a header
    assert parse(body) == RICH
    assert mail.read(b"Hi Alice,\n\n" + armor(RICH).encode()).plain == ()
    assert mail.read(armor(RICH).encode()).plain == ()


def test_a_wrong_transfer_encoding_falls_back_to_the_raw_text() -> None:
    raw = "Subject: x\nContent-Transfer-Encoding: base64\n\n" + armor(RICH)
    assert parse(raw) == RICH


def test_mbox_from_line_is_skipped() -> None:
    msg = MIMEText(PROSE + armor(RICH), "plain", "utf-8")
    assert parse(b"From bob@example.org Mon Jan  1 00:00:00 2029\n" + bytes(msg)) == RICH


def test_no_token_in_a_mail_is_not_found() -> None:
    reason, message = reason_of(MIMEText("Hi \u2014 nothing here.", "plain", "utf-8").as_bytes())
    assert reason == "not-found" and "MESHD1" in message


# --- bounds against a hostile mail -----------------------------------------------------------


def test_input_over_the_limit_names_the_limit() -> None:
    for data in (b"x" * (MAX_INPUT + 1), "\u00e9" * (MAX_INPUT // 2 + 1)):
        reason, message = reason_of(data)
        assert reason == "too-large"
        assert f"input of {MAX_INPUT + 2 if isinstance(data, str) else MAX_INPUT + 1} bytes" \
               f" exceeds the limit of {MAX_INPUT} bytes" in message
    assert parse(PROSE + armor(RICH) + " " * (MAX_INPUT - 1000)) == RICH


def nested(depth: int, inner: bytes) -> bytes:
    """``depth`` multiparts, one inside the other, around ``inner`` (a whole part)."""
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\n--b%d--\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\nMIME-Version: 1.0\n" + head + inner + tail


def b64_part(inv: Invitation) -> bytes:
    return (b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(armor(inv).encode()))


def test_nesting_is_read_to_the_depth_limit_and_no_further() -> None:
    assert parse(nested(mail.MAX_DEPTH, b64_part(RICH))) == RICH
    reason, message = reason_of(nested(mail.MAX_DEPTH + 1, b64_part(RICH)))
    assert reason == "not-found" and f"{mail.MAX_DEPTH} levels" in message


def test_absurd_nesting_does_not_recurse() -> None:
    data = nested(10_000, b64_part(RICH))  # the stdlib parser raises RecursionError on this
    assert len(data) < MAX_INPUT
    r = mail.read(data)
    assert r.plain == () and r.skipped
    assert reason_of(data)[0] == "not-found"


def test_part_count_is_bounded() -> None:
    parts = b"".join(b"--b\nContent-Type: text/plain\n\nx\n" for _ in range(30_000))
    data = b'Subject: many\nContent-Type: multipart/mixed; boundary="b"\n\n' + parts + b"--b--\n"
    assert len(data) < MAX_INPUT
    r = mail.read(data)
    assert len(r.plain) < mail.MAX_PARTS and r.skipped
    reason, message = reason_of(data)
    assert reason == "not-found" and f"{mail.MAX_PARTS} parts" in message


def test_hostile_headers_and_entities_raise_only_token_errors() -> None:
    many_params = "Content-Type: text/plain" + "; a=b" * 200_000 + "\n\nMESHD1 x\n"
    refs = "Content-Type: text/html\n\n" + "&#" + "9" * 5000 + ";" + "&#x" + "0" * 5000 + "41;"
    long_boundary = 'Content-Type: multipart/mixed; boundary="' + "b" * 100_000 + '"\n\nx\n'
    for data in (many_params, refs, long_boundary, "Content-Type: text/html\n\n" + "<" * 500_000,
                 "Content-Type: text/plain; charset=punycode\n\n" + "a-" * 300_000,
                 "Content-Type: text/plain; charset=rot13\n\n" + armor(RICH)):
        try:
            parse(data)
        except TokenError:
            pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), head=st.sampled_from([
    b"", b"Subject: x\n\n", b"Content-Type: multipart/mixed; boundary=b\n\n--b\n",
    b"Content-Type: text/html\nContent-Transfer-Encoding: quoted-printable\n\n",
    b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"]))
def test_any_bytes_raise_only_token_errors(data: bytes, head: bytes) -> None:
    try:
        parse(head + data)
    except TokenError:
        pass


# --- round trips through the email package ---------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(inv=invitations(), cte=st.sampled_from([None, "base64", "quoted-printable", "8bit"]),
       html=st.booleans(), wrap=st.sampled_from(["none", "alternative", "mixed", "forward"]),
       prose=st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=80))
def test_mails_built_by_the_email_package_round_trip(inv: Invitation, cte: str | None, html: bool,
                                                     wrap: str, prose: str) -> None:
    body = prose + "\n" + armor(inv) + "\n" + prose
    if html:
        markup = "<p>" + body.replace("&", "&amp;").replace("<", "&lt;").replace("\n", "<br>\n") + "</p>"
        msg: EmailMessage | MIMEMultipart = EmailMessage()
        msg.set_content(markup, subtype="html", cte=cte)  # type: ignore[arg-type]
    else:
        msg = mail_with(body, cte=cte) if cte else mail_with(body)
    if wrap == "alternative":
        outer = MIMEMultipart("alternative")
        outer.attach(MIMEText("no token in this one", "plain", "utf-8"))
        outer.attach(msg)
        msg = outer
    elif wrap == "mixed":
        outer = MIMEMultipart("mixed")
        outer.attach(MIMEApplication(b"\0" * 100))
        outer.attach(msg)
        msg = outer
    elif wrap == "forward":
        outer = MIMEMultipart("mixed")
        outer.attach(MIMEMessage(msg))
        msg = outer
    assert parse(msg.as_bytes()) == inv
