#!/usr/bin/env python3
"""Generates pecgate's synthetic PEC corpus: fixtures/synthetic/ and fixtures/broken/.

Deterministic (no clock, no randomness, python3 standard library only): running it
twice gives the same bytes, so the corpus can be regenerated and reviewed as a diff.

    python3 scripts/make-synthetic-fixtures.py        # from the repository root

What it writes:

* fixtures/synthetic/NN-description.eml -- one message per PEC kind and per
  tolerance or problem case, modelled on real Aruba-engine messages
  (multipart/mixed -> multipart/alternative text+html ISO-8859-1 QP, daticert.xml
  base64, postacert.eml message/rfc822). They are UNSIGNED: the top-level body is
  the `multipart/mixed` that a provider would sign (see "signing" below).
* fixtures/synthetic/manifest.json -- for each file: what it covers, what a
  correct inspection must say (kind, daticert tipo/identificativo/data in UTC
  computed here, independently of the Rust code, and substrings of the expected
  problems), and how it should be signed later.
* fixtures/broken/*.eml -- files that are not mail messages at all.

Signing (a later step, done at test time): the top-level `Content-Type:
multipart/mixed; boundary=...` header moves into the first body part of a new
`multipart/signed; <manifest "sign" params>; boundary=...`, followed by the
detached `smime.p7s`. `sign: null` means "leave as is" (non-PEC mail, anomaly
cases that must stay unsigned, or the case already in multipart/signed form
whose signature part is missing on purpose).

Addresses are invented, in reserved domains only (example.it / example.com /
.test). The expected golden `.json` files are NOT written here: run
`PECGATE_BLESS=1 cargo test --test golden` and review the diff.
"""

import base64
import datetime as dt
import hashlib
import json
import quopri
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYN = ROOT / "fixtures" / "synthetic"
BROKEN = ROOT / "fixtures" / "broken"

# ---------------------------------------------------------------------------
# The invented world

# The sender's provider (the gateway's provider) and the recipients' provider.
P1 = {
    "name": "ESEMPIO PEC S.p.A.",
    "service": "posta-certificata@pec.example.it",
    "domain": "pec.example.it",
    "host": "smtpecgw01.pec.example.it",
}
P2 = {
    "name": "Gestore Prova S.r.l.",
    "service": "posta-certificata@pec.gestore-prova.test",
    "domain": "pec.gestore-prova.test",
    "host": "mx01.pec.gestore-prova.test",
}

SENDER = "protocollo@pec.comune.example.it"
R_FORNITORE = "appalti@pec.fornitore.test"
R_TECNICO = "ufficio.tecnico@pec.example.it"
R_STUDIO = "segreteria@pec.avvocati.test"
R_ESTERNO = "info@example.com"
PROVIDER_RECEIPTS = "ricevute@pec.example.it"  # P1's service mailbox for presa in carico

SIGN_ARUBA = {
    "protocol": "application/x-pkcs7-signature",
    "micalg": "sha1",
    "content_type_params": 'protocol="application/x-pkcs7-signature"; micalg="sha1"',
}
SIGN_SHA256 = {
    "protocol": "application/pkcs7-signature",
    "micalg": "sha-256",
    "content_type_params": 'protocol="application/pkcs7-signature"; micalg="sha-256"',
}
SIGN_ARUBA_2014 = {
    "protocol": "application/x-pkcs7-signature",
    "micalg": "sha1",
    "content_type_params": 'protocol="application/x-pkcs7-signature"; micalg=sha1',
}

WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


class When:
    """A local time with an explicit offset, as daticert writes it."""

    def __init__(self, giorno, ora, zona):
        self.giorno, self.ora, self.zona = giorno, ora, zona
        d, m, y = (int(x) for x in giorno.split("/"))
        hh, mm, ss = (int(x) for x in ora.split(":"))
        sign = 1 if zona[0] == "+" else -1
        off = dt.timedelta(hours=int(zona[1:3]), minutes=int(zona[3:5])) * sign
        self.local = dt.datetime(y, m, d, hh, mm, ss, tzinfo=dt.timezone(off))

    def utc(self):
        return self.local.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def rfc2822(self, plus_seconds=0):
        t = self.local + dt.timedelta(seconds=plus_seconds)
        return "%s, %d %s %d %02d:%02d:%02d %s" % (
            WEEKDAYS[t.weekday()], t.day, MONTHS[t.month - 1], t.year,
            t.hour, t.minute, t.second, self.zona,
        )

    def compact(self):
        return self.local.strftime("%Y%m%d%H%M%S")

    def epoch(self):
        return int(self.local.timestamp())


def identificativo(when, n, domain=P1["domain"]):
    """An Aruba-engine style PEC id."""
    return "opec21010.%s.%05d.%d.1.%d@%s" % (when.compact(), 1000 + n * 37, 100 + n, 40 + n, domain)


def receipt_message_id(ident, extra):
    """Receipts have their own Message-ID, derived from the id with extra segments."""
    local, domain = ident.split("@", 1)
    head, last = local.rsplit(".", 1)
    return "%s.%d.%s@%s" % (head, extra, last, domain)


# ---------------------------------------------------------------------------
# MIME building blocks (LF line endings; converted to CRLF when written)


def b64(data, width=76):
    s = base64.b64encode(data).decode("ascii")
    return "\n".join(s[i:i + width] for i in range(0, len(s), width)) + "\n"


def qp(text, charset="iso-8859-1"):
    return quopri.encodestring(text.encode(charset)).decode("ascii")


def xml_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def html_escape(s):
    out = xml_escape(s)
    for ch, ent in (("à", "&agrave;"), ("è", "&egrave;"), ("é", "&eacute;"), ("ì", "&igrave;"),
                    ("ò", "&ograve;"), ("ù", "&ugrave;")):
        out = out.replace(ch, ent)
    return out


class Boundaries:
    """Aruba-style boundaries, deterministic per message."""

    def __init__(self, when, pid):
        self.base = "----------=_%d-%d" % (when.epoch(), pid)
        self.mixed = "%s-%d" % (self.base, 3078)  # the outer multipart/mixed
        self.n = 3078

    def next(self):
        self.n += 1
        return "%s-%d" % (self.base, self.n)


def header_lines(headers):
    """Header fields as text; a value starting with a line break is folded there."""
    return "".join("%s:%s\n" % (n, v if v.startswith("\n") else " " + v) for n, v in headers)


def multipart_body(boundary, parts):
    out = []
    for p in parts:
        out.append("--%s\n%s\n" % (boundary, p))
    out.append("--%s--\n" % boundary)
    return "".join(out)


def multipart(ctype, boundary, parts, headers=()):
    """A multipart entity (headers + body) as text."""
    return ("Content-Type: %s;\n boundary=\"%s\"\n" % (ctype, boundary) + header_lines(headers)
            + "\n" + multipart_body(boundary, parts))


def text_part(text, html=None, bnd=None, alt=True):
    """The human-readable part: multipart/alternative (text + html) or text/plain only."""
    plain = (
        'Content-Type: text/plain; charset="iso-8859-1"\n'
        "Content-Disposition: inline\n"
        "Content-Transfer-Encoding: quoted-printable\n\n" + qp(text)
    )
    if not alt:
        return plain
    htmlp = (
        'Content-Type: text/html; charset="iso-8859-1"\n'
        "Content-Disposition: inline\n"
        "Content-Transfer-Encoding: quoted-printable\n\n" + qp(html)
    )
    return multipart("multipart/alternative", bnd.next(), [plain, htmlp],
                     headers=[("Content-Transfer-Encoding", "binary")])


def daticert_part(xml_bytes):
    return (
        'Content-Type: application/xml; name="daticert.xml"\n'
        'Content-Disposition: inline; filename="daticert.xml"\n'
        "Content-Transfer-Encoding: base64\n\n" + b64(xml_bytes)
    )


def postacert_part(original):
    return (
        'Content-Type: message/rfc822; name="postacert.eml"\n'
        'Content-Disposition: inline; filename="postacert.eml"\n'
        "Content-Transfer-Encoding: 7bit\n\n" + original
    )


def pec_message(headers, parts, bnd, signed_without_signature=None):
    """A whole PEC system message: top headers + the multipart/mixed to be signed.

    With `signed_without_signature` (content-type params), the mixed entity is
    wrapped in a multipart/signed that lacks its signature part.
    """
    top = header_lines(headers) + "MIME-Version: 1.0\n"
    mixed_boundary = bnd.mixed
    if signed_without_signature is None:
        return top + multipart("multipart/mixed", mixed_boundary, parts)
    mixed = multipart("multipart/mixed", mixed_boundary, parts,
                      headers=[("Content-Transfer-Encoding", "binary"), ("MIME-Version", "1.0")])
    outer = "----%032X" % int(hashlib.md5(mixed.encode()).hexdigest(), 16)
    return (
        top
        + 'Content-Type: multipart/signed; %s; boundary="%s"\n\n' % (signed_without_signature, outer)
        + "This is an S/MIME signed message\n\n"
        + "--%s\n%s\n--%s--\n" % (outer, mixed, outer)
    )


def received(host, when, lmtp_id):
    return (
        "Received",
        "from %s (localhost [127.0.0.1])\n\tby %s (lmtpd) with LMTP id %s;\n\t%s (%s)"
        % (host, host, lmtp_id, when.rfc2822(1), "CET" if when.zona == "+0100" else "CEST"),
    )


# ---------------------------------------------------------------------------
# daticert.xml


def daticert(tipo, errore, letter, gestore, when, ident, msgid="default", ricevuta=None,
             consegna=None, ricezione=(), errore_esteso=None, destinatari=None):
    """An Aruba-style daticert.xml (4-space indent, self-closing ricevuta)."""
    if msgid == "default":
        msgid = letter["msgid"]
    if destinatari is None:
        destinatari = letter["destinatari"]
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<postacert tipo="%s" errore="%s">' % (tipo, errore),
        "    <intestazione>",
        "        <mittente>%s</mittente>" % xml_escape(letter["from"]),
    ]
    for addr, t in destinatari:
        lines.append('        <destinatari tipo="%s">%s</destinatari>' % (t, xml_escape(addr)))
    lines += [
        "        <risposte>%s</risposte>" % xml_escape(letter.get("reply_to", letter["from"])),
        "        <oggetto>%s</oggetto>" % xml_escape(letter["subject"]),
        "    </intestazione>",
        "    <dati>",
        "        <gestore-emittente>%s</gestore-emittente>" % xml_escape(gestore),
        '        <data zona="%s">' % when.zona,
        "            <giorno>%s</giorno>" % when.giorno,
        "            <ora>%s</ora>" % when.ora,
        "        </data>",
        "        <identificativo>%s</identificativo>" % xml_escape(ident),
    ]
    if msgid:
        lines.append("        <msgid>%s</msgid>" % xml_escape(msgid))
    if ricevuta:
        lines.append('        <ricevuta tipo="%s" />' % ricevuta)
    if consegna:
        lines.append("        <consegna>%s</consegna>" % xml_escape(consegna))
    for r in ricezione:
        lines.append("        <ricezione>%s</ricezione>" % xml_escape(r))
    if errore_esteso:
        lines.append("        <errore-esteso>%s</errore-esteso>" % xml_escape(errore_esteso))
    lines += ["    </dati>", "</postacert>", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Original messages (what postacert.eml carries)


def fake_pdf(seed, size):
    """Deterministic bytes that start like a PDF (incompressible body)."""
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\nstream\n"
    tail = b"\nendstream\n%%EOF\n"
    body = bytearray()
    counter = 0
    while len(head) + len(body) + len(tail) < size:
        body += hashlib.sha256(("%s:%d" % (seed, counter)).encode()).digest()
        counter += 1
    body = body[: size - len(head) - len(tail)]
    return head + bytes(body) + tail


def letter(subject, msgid, when, to, cc=(), esterni=(), frm=SENDER, body=None, attachments=(),
           tipo_ricevuta="completa"):
    """An original letter from the comune, as its mail client wrote it."""
    dest = [(a, "certificato") for a in list(to) + list(cc)] + [(a, "esterno") for a in esterni]
    return {
        "subject": subject,
        "msgid": msgid,
        "when": when,
        "from": frm,
        "to": list(to) + [a for a in esterni],
        "cc": list(cc),
        "destinatari": dest,
        "body": body
        or "Buongiorno,\nsi trasmette in allegato la documentazione richiesta.\n\n"
        "Cordiali saluti\nUfficio Protocollo - Comune di Esempio\n",
        "attachments": list(attachments),
        "tipo_ricevuta": tipo_ricevuta,
    }


def original(let, ident=None, breve=False, extra_headers=()):
    """The original message as the provider stores it in postacert.eml.

    With `ident`, Message-ID is the PEC id and X-Riferimento-Message-ID carries
    the client's id (what the access point does). With `breve`, attachments are
    replaced by `<name>.hash` text parts holding the SHA-1 of the content.
    """
    when = let["when"]
    bnd = "=_Part_%d_%s" % (when.epoch(), hashlib.sha1(let["subject"].encode()).hexdigest()[:12])
    if let["from"].rsplit("@", 1)[-1] == "example.com":
        # Ordinary mail reaching a PEC mailbox from the Internet.
        relay = ("from mail.example.com (mail.example.com [198.51.100.7])\n\t"
                 "by mx.%s (Postfix) with ESMTPS id 4XyZ7K0Pq1z9Abc\n\tfor <%s>; %s"
                 % (P1["domain"], let["to"][0], when.rfc2822(-1)))
    else:
        relay = ("from [192.0.2.15] (gateway.comune.example.it [192.0.2.15])\n\t"
                 "by %s (Postfix) with ESMTPSA id 4XyZ1Q3ZZ3z2LH56\n\tfor <%s>; %s"
                 % (P1["host"], let["to"][0], when.rfc2822(-1)))
    headers = [
        ("Received", relay),
        ("Date", when.rfc2822(-1)),
        ("From", let["from"]),
        ("To", ", ".join(let["to"])),
    ]
    if let["cc"]:
        headers.append(("Cc", ", ".join(let["cc"])))
    headers += [("Subject", let["subject"])]
    headers += list(extra_headers)
    if let["tipo_ricevuta"]:
        headers.append(("X-TipoRicevuta", let["tipo_ricevuta"]))
    if ident:
        headers.append(("Message-ID", "<%s>" % ident))
        if let["msgid"]:
            headers.append(("X-Riferimento-Message-ID", let["msgid"]))
    elif let["msgid"]:
        headers.append(("Message-ID", let["msgid"]))
    headers.append(("MIME-Version", "1.0"))
    text = (
        'Content-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: quoted-printable\n\n" + qp(let["body"], "utf-8")
    )
    if not let["attachments"]:
        return header_lines(headers) + text
    parts = [text]
    for name, ctype, data in let["attachments"]:
        if breve:
            parts.append(
                'Content-Type: text/plain; charset="us-ascii"; name="%s.hash"\n'
                'Content-Disposition: attachment; filename="%s.hash"\n'
                "Content-Transfer-Encoding: 7bit\n\n%s\n" % (name, name, hashlib.sha1(data).hexdigest())
            )
        else:
            parts.append(
                'Content-Type: %s; name="%s"\n'
                'Content-Disposition: attachment; filename="%s"\n'
                "Content-Transfer-Encoding: base64\n\n%s" % (ctype, name, name, b64(data))
            )
    headers.append(("Content-Type", 'multipart/mixed; boundary="%s"' % bnd))
    return header_lines(headers) + "\nThis is a multi-part message in MIME format.\n" + multipart_body(bnd, parts)


# ---------------------------------------------------------------------------
# Human texts (Aruba wording, ISO-8859-1)


def dest_lines(let):
    out = []
    for addr, t in let["destinatari"]:
        out.append('%s ("%s")' % (addr, "posta certificata" if t == "certificato" else "posta ordinaria"))
    return out


def html_page(title, lines):
    body = "<br>\n".join(html_escape(l) for l in lines)
    return "<html>\n<head><title>%s</title></head>\n<body>\n<h3>%s</h3>\n<hr><br>\n%s<br>\n</body>\n</html>\n" % (
        title, title, body)


def texts(kind, let, when, ident, consegna=None, errore=None, ricezione=()):
    """(plain, html) for a kind, in the Aruba style."""
    o, m = let["subject"], let["from"]
    at = "Il giorno %s alle ore %s (%s)" % (when.giorno, when.ora, when.zona)
    if kind == "accettazione":
        title = "Ricevuta di accettazione"
        lines = ['%s il messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m), "ed indirizzato a:"]
        lines += dest_lines(let)
        lines += ["è stato accettato dal sistema ed inoltrato.", "Identificativo del messaggio: " + ident]
        head = '-- Ricevuta di accettazione del messaggio indirizzato a %s --' % dest_lines(let)[0]
    elif kind == "non-accettazione":
        title = "Avviso di non accettazione"
        lines = ['%s il messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 "non è stato accettato per il seguente errore:", errore,
                 "Identificativo del messaggio: " + ident]
        head = "-- Errore nell'accettazione del messaggio --"
    elif kind == "presa-in-carico":
        title = "Ricevuta di presa in carico"
        lines = ['%s il messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 "è stato accettato dal sistema di ricezione ed è stato preso in carico per i destinatari:"]
        lines += list(ricezione) + ["Identificativo del messaggio: " + ident]
        head = "-- Ricevuta di presa in carico --"
    elif kind == "avvenuta-consegna":
        title = "Ricevuta di avvenuta consegna"
        lines = ['%s il messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 'ed indirizzato a "%s"' % consegna, "è stato correttamente consegnato al destinatario.",
                 "Identificativo del messaggio: " + ident]
        head = '-- Ricevuta di avvenuta consegna del messaggio indirizzato a %s "posta certificata" --' % consegna
    elif kind == "errore-consegna":
        title = "Avviso di mancata consegna"
        lines = ['%s nel messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 'ed indirizzato a "%s"' % consegna,
                 "è stato rilevato un problema che ne impedisce la consegna.",
                 "Il sistema ha fornito la seguente indicazione: " + errore,
                 "Identificativo del messaggio: " + ident]
        head = "-- Avviso di mancata consegna --"
    elif kind == "preavviso-errore-consegna":
        title = "Avviso di mancata consegna per superamento dei tempi massimi"
        lines = ['%s il messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 'ed indirizzato a "%s"' % consegna, errore,
                 "Identificativo del messaggio: " + ident]
        head = "-- Avviso di mancata consegna per superamento dei tempi massimi --"
    elif kind == "rilevazione-virus":
        title = "Avviso di rilevazione virus"
        lines = ['%s nel messaggio con Oggetto' % at, '"%s" inviato da "%s"' % (o, m),
                 'ed indirizzato a "%s"' % consegna, "è stato rilevato un virus: " + errore,
                 "Identificativo del messaggio: " + ident]
        head = "-- Problema di sicurezza --"
    elif kind == "posta-certificata":
        title = "Messaggio di posta certificata"
        lines = ['%s il messaggio' % at, '"%s" è stato inviato da "%s"' % (o, m), "indirizzato a:"]
        lines += ["%s" % a for a, _ in let["destinatari"]]
        lines += ["Il messaggio originale è incluso in allegato.", "Identificativo messaggio: " + ident]
        head = "-- Messaggio di posta certificata --"
    elif kind == "anomalia":
        title = "Anomalia nel messaggio"
        lines = ['%s è stato ricevuto il messaggio' % at, '"%s" proveniente da "%s"' % (o, m),
                 "ed indirizzato a: %s" % ", ".join(let["to"]),
                 "Tali dati non sono stati certificati per il seguente errore:", errore,
                 "Il messaggio originale è incluso in allegato."]
        head = "-- Anomalia nel messaggio --"
    else:
        raise ValueError(kind)
    plain = head + "\n\n" + "\n".join(lines) + \
        "\nL'allegato daticert.xml contiene informazioni di servizio sulla trasmissione\n"
    if kind == "anomalia":
        plain = head + "\n\n" + "\n".join(lines) + "\n"
    return plain, html_page(title, lines)


# ---------------------------------------------------------------------------
# The corpus

MANIFEST = []


def emit(name, content, covers, expect, sign=SIGN_ARUBA, crlf=True):
    data = content.replace("\r\n", "\n")
    if crlf:
        data = data.replace("\n", "\r\n")
    raw = data.encode("ascii") if isinstance(data, str) else data
    (SYN / name).write_bytes(raw)
    assert len(raw) < 10 * 1024 or name.startswith("60-"), (name, len(raw))
    MANIFEST.append({"file": name, "covers": covers, "line_endings": "CRLF" if crlf else "LF",
                     "expect": expect, "sign": sign})


def expect(kind, x_ricevuta=None, tipo=None, ident=None, when=None, problems=(), refers_to=None,
           daticert=True):
    e = {"kind": kind, "x_ricevuta": x_ricevuta, "refers_to": refers_to, "problems": list(problems)}
    e["daticert"] = {"tipo": tipo, "identificativo": ident, "data": when.utc()} if daticert else None
    return e


def bare(msgid):
    return msgid.strip().lstrip("<").rstrip(">") if msgid else None


def receipt(kind, let, when, ident, provider, to, n, dc_xml, subject_prefix, postacert=None,
            extra=(), alt=True, order="daticert-first", x_ricevuta=None, header_names=None,
            fold=False, signed_without_signature=None, refers=True, errore_txt=None,
            consegna=None, ricezione=(), subject=None):
    """A receipt / notice / envelope in the Aruba layout."""
    bnd = Boundaries(when, 28000 + n)
    plain, html = texts(kind if kind != "unknown" else "errore-consegna", let, when, ident,
                        consegna=consegna, errore=errore_txt, ricezione=ricezione)
    names = {"X-Ricevuta": "X-Ricevuta", "X-Riferimento-Message-ID": "X-Riferimento-Message-ID"}
    names.update(header_names or {})
    subj = subject if subject is not None else subject_prefix + let["subject"]
    h = [
        ("Return-Path", "<%s>" % provider["service"]),
        ("Delivered-To", to),
        received(provider["host"], when, "%d.002" % (14000 + n)),
        ("Subject", subj),
    ]
    if refers and let["msgid"]:
        rv = let["msgid"]
        h.append((names["X-Riferimento-Message-ID"], ("\n " + rv) if fold else rv))
    h += [
        ("Date", when.rfc2822()),
        ("Message-ID", "<%s>" % receipt_message_id(ident, 300 + n)),
        ("To", to),
    ]
    if x_ricevuta is not False:
        xr = x_ricevuta or kind
        h.append((names["X-Ricevuta"], ("\n " + xr) if fold else xr))
    h += list(extra)
    h.append(("From", provider["service"]))
    parts = [text_part(plain, html, bnd, alt=alt)]
    dpart = [daticert_part(dc_xml)] if dc_xml is not None else []
    ppart = [postacert_part(postacert)] if postacert is not None else []
    parts += (dpart + ppart) if order == "daticert-first" else (ppart + dpart)
    return pec_message(h, parts, bnd, signed_without_signature)


def envelope(let, when, ident, n, dc_xml, postacert, to=None, kind="posta-certificata",
             tipo_ricevuta_header=("X-TipoRicevuta", "completa"), subject=None, order="daticert-first",
             extra=(), provider=P1, errore_txt=None, x_trasporto=None, alt=True):
    """A transport (or anomaly) envelope as delivered to a recipient."""
    bnd = Boundaries(when, 17000 + n)
    plain, html = texts(kind, let, when, ident, errore=errore_txt)
    to = to or let["to"][0]
    h = [
        ("Return-Path", "<%s>" % provider["service"]),
        ("Delivered-To", to),
        received(P1["host"] if to.endswith("comune.example.it") else P2["host"], when,
                 "%d.002" % (26000 + n)),
        ("Subject", subject if subject is not None else "POSTA CERTIFICATA: " + let["subject"]),
    ]
    if let["msgid"] and kind == "posta-certificata":
        h.append(("X-Riferimento-Message-ID", let["msgid"]))
    h += [
        ("Date", when.rfc2822()),
        ("Reply-To", let.get("reply_to", let["from"])),
        ("To", ", ".join(let["to"])),
    ]
    if let["cc"]:
        h.append(("Cc", ", ".join(let["cc"])))
    h.append(("X-Trasporto", x_trasporto or ("posta-certificata" if kind == "posta-certificata" else "errore")))
    h.append(("From", '"Per conto di: %s" <%s>' % (let["from"], provider["service"])))
    if tipo_ricevuta_header:
        h.append(tipo_ricevuta_header)
    h += list(extra)
    if kind == "posta-certificata":
        h.append(("Message-ID", "<%s>" % ident))
    parts = [text_part(plain, html, bnd, alt=alt)]
    dpart = [daticert_part(dc_xml)] if dc_xml is not None else []
    ppart = [postacert_part(postacert)] if postacert is not None else []
    parts += (dpart + ppart) if order == "daticert-first" else (ppart + dpart)
    return pec_message(h, parts, bnd)


def build():
    # Times: winter (+0100) and summer (+0200), one across midnight, one across
    # the year boundary, one on the DST change day.
    w_jan = When("13/01/2025", "16:39:26", "+0100")
    w_aug = When("18/08/2025", "17:37:14", "+0200")
    w_midnight = When("01/04/2025", "00:30:05", "+0200")
    w_newyear = When("01/01/2025", "00:15:00", "+0100")
    w_dst = When("30/03/2025", "03:10:00", "+0200")
    w_nov = When("14/11/2024", "09:05:59", "+0100")

    pdf_small = fake_pdf("determina-123", 1800)
    att_small = [("determina_123_2025.pdf", "application/pdf", pdf_small)]

    # The main letter: comune -> fornitore (PEC), ufficio tecnico (PEC, Cc), info (ordinary)
    L = letter("Prot. 123/2025 - Richiesta documentazione",
               "<gw-20250113-0001.7f3c2a@gateway.comune.example.it>", w_jan,
               to=[R_FORNITORE], cc=[R_TECNICO], esterni=[R_ESTERNO], attachments=att_small)
    ID = identificativo(w_jan, 1)
    acc = When(w_jan.giorno, w_jan.ora, w_jan.zona)
    cons = When("13/01/2025", "16:39:28", "+0100")

    # 01 accettazione -------------------------------------------------------
    x = daticert("accettazione", "nessuno", L, P1["name"], acc, ID)
    emit("01-accettazione.eml",
         receipt("accettazione", L, acc, ID, P1, SENDER, 1, x.encode(), "ACCETTAZIONE: "),
         "ricevuta di accettazione, Aruba layout; destinatari certificato (To, Cc) and esterno",
         expect("accettazione", "accettazione", "accettazione", ID, acc, refers_to=bare(L["msgid"])))

    # 02 non-accettazione (formal) --------------------------------------------
    L2 = letter("Invio fattura n. 45/2025", "<gw-20250818-0002.a1b2c3@gateway.comune.example.it>",
                w_aug, to=[R_FORNITORE])
    ID2 = identificativo(w_aug, 2)
    err2 = "il destinatario segreteria@pec.avvocati.test non è presente nei campi To o Cc"
    x = daticert("non-accettazione", "altro", L2, P1["name"], w_aug, ID2,
                 errore_esteso="Errore formale: destinatario non presente nelle intestazioni")
    emit("02-non-accettazione.eml",
         receipt("non-accettazione", L2, w_aug, ID2, P1, SENDER, 2, x.encode(),
                 "AVVISO DI NON ACCETTAZIONE: ", errore_txt=err2),
         "avviso di non accettazione for a formal error (errore=altro)",
         expect("non-accettazione", "non-accettazione", "non-accettazione", ID2, w_aug,
                refers_to=bare(L2["msgid"])))

    # 03 non-accettazione per virus -------------------------------------------
    L3 = letter("Documentazione gara", "<gw-20250818-0003.d4e5f6@gateway.comune.example.it>",
                w_aug, to=[R_FORNITORE])
    ID3 = identificativo(w_aug, 3)
    x = daticert("non-accettazione", "virus", L3, P1["name"], w_aug, ID3,
                 errore_esteso="virus rilevato: Eicar-Test-Signature")
    emit("03-non-accettazione-virus.eml",
         receipt("non-accettazione", L3, w_aug, ID3, P1, SENDER, 3, x.encode(),
                 "AVVISO DI NON ACCETTAZIONE PER VIRUS: ",
                 extra=[("X-VerificaSicurezza", "errore")],
                 errore_txt="è stato rilevato un virus (Eicar-Test-Signature)"),
         "avviso di non accettazione per virus: X-VerificaSicurezza: errore, errore=virus",
         expect("non-accettazione", "non-accettazione", "non-accettazione", ID3, w_aug,
                refers_to=bare(L3["msgid"])), sign=SIGN_SHA256)

    # 04 presa in carico (provider to provider), several ricezione ------------
    L4 = letter("Convocazione conferenza dei servizi",
                "<gw-20250401-0004.0badf00d@gateway.comune.example.it>", w_midnight,
                to=["lavori.pubblici@pec.gestore-prova.test", "ambiente@pec.gestore-prova.test"],
                cc=[R_FORNITORE])
    ID4 = identificativo(w_midnight, 4)
    ric = ["lavori.pubblici@pec.gestore-prova.test", "ambiente@pec.gestore-prova.test", R_FORNITORE]
    x = daticert("presa-in-carico", "nessuno", L4, P2["name"], w_midnight, ID4, ricezione=ric)
    emit("04-presa-in-carico.eml",
         receipt("presa-in-carico", L4, w_midnight, ID4, P2, PROVIDER_RECEIPTS, 4, x.encode(),
                 "PRESA IN CARICO: ", ricezione=ric),
         "ricevuta di presa in carico (provider to provider) with three <ricezione>; "
         "data across midnight (+0200 -> previous day in UTC)",
         expect("presa-in-carico", "presa-in-carico", "presa-in-carico", ID4, w_midnight,
                refers_to=bare(L4["msgid"])))

    # 05 avvenuta consegna completa ------------------------------------------
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("05-avvenuta-consegna-completa.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 5, x.encode(), "CONSEGNA: ",
                 postacert=original(L, ID), consegna=R_FORNITORE),
         "ricevuta di avvenuta consegna completa: postacert.eml with a PDF attachment",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])))

    # 06 breve ---------------------------------------------------------------
    Lb = dict(L, tipo_ricevuta="breve")
    x = daticert("avvenuta-consegna", "nessuno", Lb, P2["name"], cons, ID, ricevuta="breve",
                 consegna=R_FORNITORE)
    emit("06-avvenuta-consegna-breve.eml",
         receipt("avvenuta-consegna", Lb, cons, ID, P2, SENDER, 6, x.encode(), "CONSEGNA: ",
                 postacert=original(Lb, ID, breve=True), consegna=R_FORNITORE),
         "ricevuta di avvenuta consegna breve: attachment replaced by a .hash text part (SHA-1)",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])), sign=SIGN_SHA256)

    # 07 sintetica (the Cc recipient of a completa letter gets one) ----------
    x = daticert("avvenuta-consegna", "nessuno", L, P1["name"], cons, ID, ricevuta="sintetica",
                 consegna=R_TECNICO)
    emit("07-avvenuta-consegna-sintetica.eml",
         receipt("avvenuta-consegna", L, cons, ID, P1, SENDER, 7, x.encode(), "CONSEGNA: ",
                 consegna=R_TECNICO),
         "ricevuta di avvenuta consegna sintetica: no postacert.eml",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])))

    # 08 errore-consegna no-dest ---------------------------------------------
    L8 = letter("Richiesta preventivo", "<gw-20241114-0008.cafe01@gateway.comune.example.it>",
                w_nov, to=["inesistente@pec.gestore-prova.test"])
    ID8 = identificativo(w_nov, 8)
    ee8 = "5.1.1 - Gestore Prova S.r.l. - indirizzo non valido"
    x = daticert("errore-consegna", "no-dest", L8, P2["name"], w_nov, ID8,
                 consegna="inesistente@pec.gestore-prova.test", errore_esteso=ee8)
    emit("08-errore-consegna-no-dest.eml",
         receipt("errore-consegna", L8, w_nov, ID8, P2, SENDER, 8, x.encode(),
                 "AVVISO DI MANCATA CONSEGNA: ", errore_txt=ee8,
                 consegna="inesistente@pec.gestore-prova.test"),
         "avviso di mancata consegna, errore=no-dest, errore-esteso 5.1.1",
         expect("errore-consegna", "errore-consegna", "errore-consegna", ID8, w_nov,
                refers_to=bare(L8["msgid"])))

    # 09 errore-consegna per virus (from the sender's provider) --------------
    L9 = letter("Trasmissione elaborati", "<gw-20241114-0009.cafe02@gateway.comune.example.it>",
                w_nov, to=[R_STUDIO])
    ID9 = identificativo(w_nov, 9)
    x = daticert("errore-consegna", "virus", L9, P1["name"], w_nov, ID9, consegna=R_STUDIO,
                 errore_esteso="5.7.1 - virus rilevato dal gestore del destinatario")
    emit("09-errore-consegna-virus.eml",
         receipt("errore-consegna", L9, w_nov, ID9, P1, SENDER, 9, x.encode(),
                 "AVVISO DI MANCATA CONSEGNA PER VIRUS: ", extra=[("X-VerificaSicurezza", "errore")],
                 errore_txt="virus rilevato", consegna=R_STUDIO),
         "avviso di mancata consegna per virus: X-VerificaSicurezza: errore, errore=virus",
         expect("errore-consegna", "errore-consegna", "errore-consegna", ID9, w_nov,
                refers_to=bare(L9["msgid"])))

    # 10 mailbox full ---------------------------------------------------------
    L10 = letter("Sollecito pagamento", "<gw-20250818-0010.beef10@gateway.comune.example.it>",
                 w_aug, to=[R_STUDIO])
    ID10 = identificativo(w_aug, 10)
    ee10 = "5.2.2 - Gestore Prova S.r.l. - casella piena"
    x = daticert("errore-consegna", "altro", L10, P2["name"], w_aug, ID10, consegna=R_STUDIO,
                 errore_esteso=ee10)
    emit("10-errore-consegna-casella-piena.eml",
         receipt("errore-consegna", L10, w_aug, ID10, P2, SENDER, 10, x.encode(),
                 "AVVISO DI MANCATA CONSEGNA: ", errore_txt=ee10, consegna=R_STUDIO),
         "avviso di mancata consegna, mailbox full: errore=altro, errore-esteso 5.2.2",
         expect("errore-consegna", "errore-consegna", "errore-consegna", ID10, w_aug,
                refers_to=bare(L10["msgid"])), sign=SIGN_SHA256)

    # 11/12 preavviso (12 h, 24 h) -------------------------------------------
    L11 = letter("Richiesta parere", "<gw-20250818-0011.feed11@gateway.comune.example.it>",
                 w_aug, to=[R_STUDIO])
    ID11 = identificativo(w_aug, 11)
    t12 = When("19/08/2025", "05:37:15", "+0200")
    ee12 = "4.4.7 - ESEMPIO PEC S.p.A. - nessuna ricevuta entro 12 ore"
    x = daticert("preavviso-errore-consegna", "altro", L11, P1["name"], t12, ID11, consegna=R_STUDIO,
                 errore_esteso=ee12)
    emit("11-preavviso-errore-consegna-12h.eml",
         receipt("preavviso-errore-consegna", L11, t12, ID11, P1, SENDER, 11, x.encode(),
                 "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: ", consegna=R_STUDIO,
                 errore_txt="Entro 12 ore non è pervenuta alcuna ricevuta: il messaggio potrebbe "
                            "non essere consegnato."),
         "preavviso di mancata consegna after 12 h, errore-esteso 4.4.7 (non-final)",
         expect("preavviso-errore-consegna", "preavviso-errore-consegna", "preavviso-errore-consegna",
                ID11, t12, refers_to=bare(L11["msgid"])))
    t24 = When("19/08/2025", "17:37:15", "+0200")
    ee24 = "5.4.1 - ESEMPIO PEC S.p.A. - messaggio non consegnato entro 24 ore"
    x = daticert("preavviso-errore-consegna", "altro", L11, P1["name"], t24, ID11, consegna=R_STUDIO,
                 errore_esteso=ee24)
    emit("12-preavviso-errore-consegna-24h.eml",
         receipt("preavviso-errore-consegna", L11, t24, ID11, P1, SENDER, 12, x.encode(),
                 "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: ", consegna=R_STUDIO,
                 errore_txt="Entro 24 ore non è pervenuta la ricevuta di avvenuta consegna."),
         "avviso di mancata consegna after 24 h: same X-Ricevuta, errore-esteso 5.4.1 (final)",
         expect("preavviso-errore-consegna", "preavviso-errore-consegna", "preavviso-errore-consegna",
                ID11, t24, refers_to=bare(L11["msgid"])))

    # 13 rilevazione virus (provider to provider) ----------------------------
    x = daticert("rilevazione-virus", "virus", L9, P2["name"], w_nov, ID9, consegna=R_STUDIO,
                 errore_esteso="virus rilevato: Eicar-Test-Signature")
    emit("13-rilevazione-virus.eml",
         receipt("rilevazione-virus", L9, w_nov, ID9, P2, PROVIDER_RECEIPTS, 13, x.encode(),
                 "PROBLEMA DI SICUREZZA: ", extra=[("X-Mittente", SENDER)],
                 errore_txt="Eicar-Test-Signature", consegna=R_STUDIO),
         "avviso di rilevazione virus (provider to provider) with X-Mittente",
         expect("rilevazione-virus", "rilevazione-virus", "rilevazione-virus", ID9, w_nov,
                refers_to=bare(L9["msgid"])))

    # 14 busta di trasporto with X-TipoRicevuta -------------------------------
    L14 = letter("Trasmissione verbale di sopralluogo",
                 "<RZLFE1$D00882600B2330420CAE7B3643F81CDD@pec.comune.example.it>", w_aug,
                 to=[R_FORNITORE], attachments=att_small)
    ID14 = identificativo(w_aug, 14)
    x = daticert("posta-certificata", "nessuno", L14, P1["name"], w_aug, ID14, ricevuta="completa")
    emit("14-busta-trasporto.eml",
         envelope(L14, w_aug, ID14, 14, x.encode(), original(L14, ID14)),
         "busta di trasporto (incoming PEC) with X-TipoRicevuta: completa; webmail-style msgid with $",
         expect("posta-certificata", None, "posta-certificata", ID14, w_aug, refers_to=bare(L14["msgid"])))

    # 15 busta without X-TipoRicevuta, text/plain only (Aruba 2014 layout) -----
    L15 = letter("Re: richiesta chiarimenti", "<gw-20250101-0015.abcdef@gateway.comune.example.it>",
                 w_newyear, to=[R_FORNITORE])
    ID15 = identificativo(w_newyear, 15)
    x = daticert("posta-certificata", "nessuno", L15, P1["name"], w_newyear, ID15, ricevuta="completa")
    emit("15-busta-trasporto-senza-tiporicevuta.eml",
         envelope(L15, w_newyear, ID15, 15, x.encode(), original(L15, ID15), tipo_ricevuta_header=None,
                  alt=False),
         "busta di trasporto without X-TipoRicevuta (daticert still says completa); single text/plain "
         "body (Aruba 2014); data across the year boundary",
         expect("posta-certificata", None, "posta-certificata", ID15, w_newyear, refers_to=bare(L15["msgid"])),
         sign=SIGN_ARUBA_2014)

    # 16 busta di anomalia ----------------------------------------------------
    L16 = letter("Offerta commerciale", "<20250818153701.4242@mail.example.com>", w_aug,
                 to=[SENDER], frm="commerciale@example.com", tipo_ricevuta=None,
                 body="Gentile cliente,\nle proponiamo la nostra offerta di gennaio.\n")
    emit("16-busta-anomalia.eml",
         envelope(L16, w_aug, None, 16, None, original(L16), kind="anomalia", to=SENDER,
                  tipo_ricevuta_header=None, subject="ANOMALIA MESSAGGIO: " + L16["subject"],
                  extra=[("Message-ID", L16["msgid"])], provider=P1,
                  errore_txt="il messaggio non è un messaggio di posta certificata"),
         "busta di anomalia: X-Trasporto: errore, ordinary message wrapped as the only other part, no daticert",
         expect("anomalia", None, daticert=False, problems=[]))

    # 17 non-pec ordinary mail -----------------------------------------------
    L17 = letter("Newsletter servizi comunali", "<20250113.0017@mail.example.com>", w_jan,
                 to=[SENDER], frm="newsletter@example.com", tipo_ricevuta=None,
                 body="Gentile utente,\nla newsletter di gennaio è disponibile.\n")
    emit("17-non-pec.eml", original(L17),
         "ordinary mail (no PEC header at the top level)",
         expect("non-pec", None, daticert=False), sign=None)

    # 18 unknown X-Ricevuta ----------------------------------------------------
    x = daticert("errore-consegna", "no-dest", L8, P2["name"], w_nov, ID8,
                 consegna="inesistente@pec.gestore-prova.test", errore_esteso=ee8)
    emit("18-x-ricevuta-sconosciuta.eml",
         receipt("unknown", L8, w_nov, ID8, P2, SENDER, 18, x.encode(), "AVVISO DI MANCATA CONSEGNA: ",
                 x_ricevuta="mancata-consegna", errore_txt=ee8,
                 consegna="inesistente@pec.gestore-prova.test"),
         "X-Ricevuta value not in the rules (mancata-consegna): kind unknown, raw value kept",
         expect("unknown", "mancata-consegna", "errore-consegna", ID8, w_nov, refers_to=bare(L8["msgid"]),
                problems=['unknown PEC message type "mancata-consegna"',
                          "header says unknown but daticert says errore-consegna"]))

    # ------------------------------------------------------------------ tolerances
    # 20 header names and values in odd case
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("20-header-names-odd-case.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 20, x.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE, x_ricevuta="AVVENUTA-CONSEGNA", postacert=original(L, ID),
                 header_names={"X-Ricevuta": "x-ricevuta",
                               "X-Riferimento-Message-ID": "X-RIFERIMENTO-MESSAGE-ID"}),
         "header names in odd case (x-ricevuta, X-RIFERIMENTO-MESSAGE-ID) and an upper-case X-Ricevuta value",
         expect("avvenuta-consegna", "AVVENUTA-CONSEGNA", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])))

    # 21 X-Tiporicevuta (Aruba/Sogei spelling), breve, lower-case x-trasporto
    L21 = dict(L14, tipo_ricevuta="breve", msgid="<gw-20250818-0021.5eed21@gateway.comune.example.it>")
    ID21 = identificativo(w_aug, 21)
    x = daticert("posta-certificata", "nessuno", L21, P1["name"], w_aug, ID21, ricevuta="breve")
    emit("21-busta-x-tiporicevuta-odd-case.eml",
         envelope(L21, w_aug, ID21, 21, x.encode(), original(L21, ID21),
                  tipo_ricevuta_header=("X-Tiporicevuta", "breve"), x_trasporto="Posta-Certificata")
         .replace("X-Trasporto:", "x-trasporto:"),
         "busta with X-Tiporicevuta (provider spelling), x-trasporto in lower case, value Posta-Certificata",
         expect("posta-certificata", None, "posta-certificata", ID21, w_aug, refers_to=bare(L21["msgid"])),
         sign=SIGN_SHA256)

    # 22 folded header values
    x = daticert("errore-consegna", "no-dest", L8, P2["name"], w_nov, ID8,
                 consegna="inesistente@pec.gestore-prova.test", errore_esteso=ee8)
    msg = receipt("errore-consegna", L8, w_nov, ID8, P2, SENDER, 22, x.encode(), "",
                  fold=True, errore_txt=ee8, consegna="inesistente@pec.gestore-prova.test",
                  subject="AVVISO DI MANCATA CONSEGNA:\n " + L8["subject"])
    emit("22-folded-headers.eml", msg,
         "folded X-Ricevuta, X-Riferimento-Message-ID and Subject values",
         expect("errore-consegna", "errore-consegna", "errore-consegna", ID8, w_nov,
                refers_to=bare(L8["msgid"])))

    # 23 RFC 2047 encoded subject (the original subject had accented letters)
    L23 = letter("Attività di verifica: è già pronta la relazione?",
                 "<gw-20250330-0023.c0ffee@gateway.comune.example.it>", w_dst, to=[R_FORNITORE])
    ID23 = identificativo(w_dst, 23)
    x = daticert("accettazione", "nessuno", L23, P1["name"], w_dst, ID23)
    enc = "=?UTF-8?B?%s?=" % base64.b64encode(L23["subject"].encode("utf-8")).decode()
    emit("23-subject-rfc2047.eml",
         receipt("accettazione", L23, w_dst, ID23, P1, SENDER, 23, x.encode(), "",
                 subject="ACCETTAZIONE: " + enc),
         "RFC 2047 encoded subject after the prefix; UTF-8 oggetto in daticert; data on the DST change day",
         expect("accettazione", "accettazione", "accettazione", ID23, w_dst, refers_to=bare(L23["msgid"])))

    # 24 LF-only line endings
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("24-lf-line-endings.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 24, x.encode(), "CONSEGNA: ",
                 postacert=original(L, ID), consegna=R_FORNITORE),
         "the whole file with LF line endings (as stored by many tools)",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])), crlf=False)

    # 25 daticert in ISO-8859-1
    L25 = letter("Comunicazione sull'attività di verifica: è già pronta la città?",
                 "<gw-20250818-0025.1a7e25@gateway.comune.example.it>", w_aug, to=[R_FORNITORE])
    ID25 = identificativo(w_aug, 25)
    x = daticert("accettazione", "nessuno", L25, P1["name"], w_aug, ID25)
    x = x.replace('encoding="UTF-8"', 'encoding="ISO-8859-1"')
    emit("25-daticert-latin1.eml",
         receipt("accettazione", L25, w_aug, ID25, P1, SENDER, 25, x.encode("latin-1"), "",
                 subject="ACCETTAZIONE: =?iso-8859-1?Q?Comunicazione_sull'attivit=E0_di_verifica:_?="
                         " =?iso-8859-1?Q?=E8_gi=E0_pronta_la_citt=E0=3F?="),
         "daticert declared ISO-8859-1 with real latin-1 bytes (accented oggetto)",
         expect("accettazione", "accettazione", "accettazione", ID25, w_aug, refers_to=bare(L25["msgid"])))

    # 26 DOCTYPE + xml-stylesheet PI (Telecom/RUPAR 2013 style), 3 destinatari 1 consegna
    L26 = letter("Trasmissione delibera", "<gw-20250113-0026.d0c7e5@gateway.comune.example.it>", w_jan,
                 to=[R_FORNITORE, R_STUDIO, "ragioneria@pec.comune.example.it"])
    ID26 = "202501131639260100.0787.pech@pec.gestore-prova.test"
    x = daticert("avvenuta-consegna", "nessuno", L26, "I.T. Prova S.R.L.", cons, ID26,
                 ricevuta="completa", consegna=R_STUDIO)
    x = x.replace(
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<?xml-stylesheet type="text/xsl" href="https://pec.gestore-prova.test/dtd/postacert.xsl"?>\n'
        '<!DOCTYPE postacert PUBLIC "posta certificata" "https://pec.gestore-prova.test/dtd/postacert.dtd">\n')
    emit("26-daticert-doctype-stylesheet.eml",
         receipt("avvenuta-consegna", L26, cons, ID26, P2, SENDER, 26, x.encode(), "CONSEGNA: ",
                 consegna=R_STUDIO),
         "daticert with xml-stylesheet PI and external DOCTYPE (never fetched); non-Aruba identificativo",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID26, cons,
                refers_to=bare(L26["msgid"])))

    # 27 msgid without angle brackets
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE, msgid=bare(L["msgid"]))
    emit("27-msgid-without-brackets.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 27, x.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "daticert <msgid> without &lt;&gt; (header keeps them): still the same id",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])))

    # 28 lots of whitespace
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    x = (x.replace("<postacert tipo=\"avvenuta-consegna\" errore=\"nessuno\">",
                   "<postacert   tipo = \"  avvenuta-consegna \"\n\t errore=\" nessuno \"  >")
         .replace("<mittente>", "<mittente>\n\t\t   ").replace("</mittente>", "   \n\t</mittente>")
         .replace("<identificativo>", "<identificativo>\r\n      ")
         .replace("</identificativo>", "\t\r\n   </identificativo>")
         .replace("<giorno>", "<giorno> ").replace("</ora>", "  </ora>")
         .replace("<consegna>", "<consegna>\n  ").replace('zona="+0100"', 'zona=" +0100 "')
         .replace('<ricevuta tipo="completa" />', '<ricevuta   tipo="completa"   ></ricevuta>')
         .replace("    ", "\t  \t"))
    msg = receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 28, x.encode(), "CONSEGNA: ",
                  consegna=R_FORNITORE)
    msg = msg.replace("X-Ricevuta: avvenuta-consegna", "X-Ricevuta:    avvenuta-consegna   ")
    emit("28-whitespace.eml", msg,
         "whitespace everywhere: inside daticert elements and attributes, tabs, CRLF in the XML, "
         "padded X-Ricevuta value",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])))

    # 29 elements out of order
    x29 = "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<postacert errore="nessuno" tipo="avvenuta-consegna">',
        "  <dati>",
        "    <consegna>%s</consegna>" % R_FORNITORE,
        '    <ricevuta tipo="completa"/>',
        "    <identificativo>%s</identificativo>" % ID,
        '    <data zona="+0100"><ora>16:39:28</ora><giorno>13/01/2025</giorno></data>',
        "    <msgid>&lt;%s&gt;</msgid>" % bare(L["msgid"]),
        "    <gestore-emittente>%s</gestore-emittente>" % P2["name"],
        "  </dati>",
        "  <intestazione>",
        "    <oggetto>%s</oggetto>" % L["subject"],
        '    <destinatari tipo="esterno">%s</destinatari>' % R_ESTERNO,
        "    <risposte>%s</risposte>" % SENDER,
        "    <destinatari>%s</destinatari>" % R_FORNITORE,
        '    <destinatari tipo="certificato">%s</destinatari>' % R_TECNICO,
        "    <mittente>%s</mittente>" % SENDER,
        "  </intestazione>",
        "</postacert>", ""])
    emit("29-daticert-elements-out-of-order.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 29, x29.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "daticert with dati before intestazione, shuffled children, ora before giorno, attributes "
         "swapped, a destinatari without tipo (defaults to certificato)",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"])), sign=SIGN_SHA256)

    # 30 double POSTA CERTIFICATA prefix (a reply to an envelope)
    L30 = letter("POSTA CERTIFICATA: Re: Trasmissione verbale di sopralluogo",
                 "<gw-20250818-0030.4e4e30@pec.fornitore.test>", w_aug, to=[SENDER], frm=R_FORNITORE)
    ID30 = identificativo(w_aug, 30, domain=P2["domain"])
    x = daticert("posta-certificata", "nessuno", L30, P2["name"], w_aug, ID30, ricevuta="completa")
    emit("30-double-subject-prefix.eml",
         envelope(L30, w_aug, ID30, 30, x.encode(), original(L30, ID30), provider=P2),
         "busta whose subject is POSTA CERTIFICATA: POSTA CERTIFICATA: Re: ... and whose oggetto "
         "starts with the prefix",
         expect("posta-certificata", None, "posta-certificata", ID30, w_aug, refers_to=bare(L30["msgid"])))

    # 31 postacert.eml before daticert.xml
    x = daticert("posta-certificata", "nessuno", L14, P1["name"], w_aug, ID14, ricevuta="completa")
    emit("31-postacert-before-daticert.eml",
         envelope(L14, w_aug, ID14, 31, x.encode(), original(L14, ID14), order="postacert-first"),
         "busta with postacert.eml before daticert.xml (either order is allowed)",
         expect("posta-certificata", None, "posta-certificata", ID14, w_aug, refers_to=bare(L14["msgid"])))

    # 32 original without Message-ID (Postecom 2012): no msgid, no X-Riferimento-Message-ID
    L32 = letter("Avviso pubblico", None, w_nov, to=[R_FORNITORE], esterni=[R_ESTERNO])
    ID32 = "E82D9D8F.000073B6.E8F90950.8520A581.posta-certificata@pec.example.it"
    x = daticert("posta-certificata", "nessuno", L32, "ESEMPIO PEC S.p.A. - GRUPPO ESEMPIO", w_nov, ID32,
                 ricevuta="completa", msgid=None)
    emit("32-busta-without-msgid.eml",
         envelope(L32, w_nov, ID32, 32, x.encode(), original(L32, ID32)),
         "busta of an original without Message-ID: no <msgid>, no X-Riferimento-Message-ID; "
         "Postecom-style identificativo; esterno recipient",
         expect("posta-certificata", None, "posta-certificata", ID32, w_nov, refers_to=None))

    # 33 a forged X-Ricevuta inside the wrapped original is ignored
    L33 = letter("CONSEGNA: Prot. 123/2025 - Richiesta documentazione",
                 "<forged.0033@pec.fornitore.test>", w_aug, to=[SENDER], frm=R_FORNITORE)
    ID33 = identificativo(w_aug, 33, domain=P2["domain"])
    x = daticert("posta-certificata", "nessuno", L33, P2["name"], w_aug, ID33, ricevuta="completa")
    emit("33-busta-forged-inner-x-ricevuta.eml",
         envelope(L33, w_aug, ID33, 33, x.encode(),
                  original(L33, ID33, extra_headers=[("X-Ricevuta", "avvenuta-consegna"),
                                                      ("X-Riferimento-Message-ID", L["msgid"])]),
                  provider=P2),
         "busta whose original (written by a person) carries X-Ricevuta: avvenuta-consegna: "
         "only top-level headers count",
         expect("posta-certificata", None, "posta-certificata", ID33, w_aug, refers_to=bare(L33["msgid"])))

    # 34 entities and CDATA in daticert
    L34 = letter("Lavori \"Piazza Roma\" <lotto 2> & varianti",
                 "<gw-20250818-0034.e7e734@gateway.comune.example.it>", w_aug, to=[R_FORNITORE])
    ID34 = identificativo(w_aug, 34)
    x = daticert("accettazione", "nessuno", L34, P1["name"], w_aug, ID34)
    x = x.replace("<gestore-emittente>ESEMPIO PEC S.p.A.</gestore-emittente>",
                  "<gestore-emittente><![CDATA[ESEMPIO PEC S.p.A.]]></gestore-emittente>")
    x = x.replace("varianti</oggetto>", "varianti &#8211; rev. &#x31;</oggetto>")
    emit("34-daticert-entities-cdata.eml",
         receipt("accettazione", L34, w_aug, ID34, P1, SENDER, 34, x.encode(), "",
                 subject="ACCETTAZIONE: " + L34["subject"]),
         "daticert with predefined entities, character references and CDATA",
         expect("accettazione", "accettazione", "accettazione", ID34, w_aug, refers_to=bare(L34["msgid"])))

    # ------------------------------------------------------------------ problems
    # 40 header says accettazione, daticert says avvenuta-consegna
    x = daticert("avvenuta-consegna", "nessuno", L, P1["name"], acc, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("40-problem-tipo-mismatch.eml",
         receipt("accettazione", L, acc, ID, P1, SENDER, 40, x.encode(), "ACCETTAZIONE: "),
         "PROBLEM: X-Ricevuta accettazione but daticert tipo avvenuta-consegna",
         expect("accettazione", "accettazione", "avvenuta-consegna", ID, acc, refers_to=bare(L["msgid"]),
                problems=["header says accettazione but daticert says avvenuta-consegna"]))

    # 41 X-Riferimento-Message-ID differs from daticert msgid
    Lx = dict(L, msgid="<gw-20250113-9999.000000@gateway.comune.example.it>")
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("41-problem-msgid-mismatch.eml",
         receipt("avvenuta-consegna", Lx, cons, ID, P2, SENDER, 41, x.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "PROBLEM: X-Riferimento-Message-ID differs from the daticert msgid",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(Lx["msgid"]), problems=["differs from daticert msgid"]))

    # 42 truncated daticert
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("42-problem-daticert-truncated.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 42, x.encode()[:700], "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "PROBLEM: daticert.xml truncated (not well-formed): daticert null",
         expect("avvenuta-consegna", "avvenuta-consegna", daticert=False, refers_to=bare(L["msgid"]),
                problems=["daticert malformed"]))

    # 43 daticert without identificativo
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa",
                 consegna=R_FORNITORE)
    x = "\n".join(l for l in x.split("\n") if "<identificativo>" not in l)
    emit("43-problem-daticert-no-identificativo.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 43, x.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "PROBLEM: daticert without <identificativo>: daticert null",
         expect("avvenuta-consegna", "avvenuta-consegna", daticert=False, refers_to=bare(L["msgid"]),
                problems=["missing <identificativo>"]))

    # 44 avvenuta-consegna without consegna
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="completa")
    emit("44-problem-consegna-missing.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 44, x.encode(), "CONSEGNA: ",
                 consegna=R_FORNITORE),
         "PROBLEM: avvenuta-consegna whose daticert has no <consegna>",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"]), problems=["has no <consegna>"]))

    # 45 busta without postacert.eml
    x = daticert("posta-certificata", "nessuno", L14, P1["name"], w_aug, ID14, ricevuta="completa")
    emit("45-problem-busta-without-postacert.eml",
         envelope(L14, w_aug, ID14, 45, x.encode(), None),
         "PROBLEM: transport envelope without postacert.eml",
         expect("posta-certificata", None, "posta-certificata", ID14, w_aug, refers_to=bare(L14["msgid"]),
                problems=["transport envelope without postacert.eml"]))

    # 46 anomaly envelope carrying a daticert
    x = daticert("posta-certificata", "nessuno", L16, P1["name"], w_aug, ID14, ricevuta="completa")
    emit("46-problem-anomalia-with-daticert.eml",
         envelope(L16, w_aug, None, 46, x.encode(), original(L16), kind="anomalia", to=SENDER,
                  tipo_ricevuta_header=None, subject="ANOMALIA MESSAGGIO: " + L16["subject"],
                  extra=[("Message-ID", L16["msgid"])],
                  errore_txt="il messaggio non è un messaggio di posta certificata"),
         "PROBLEM: anomaly envelope that carries a daticert.xml (forbidden)",
         expect("anomalia", None, "posta-certificata", ID14, w_aug,
                problems=["anomaly envelope carries a daticert.xml"]))

    # 47 multipart/signed whose signature part is missing
    x = daticert("accettazione", "nessuno", L, P1["name"], acc, ID)
    emit("47-problem-signed-without-signature.eml",
         receipt("accettazione", L, acc, ID, P1, SENDER, 47, x.encode(), "ACCETTAZIONE: ",
                 signed_without_signature=SIGN_SHA256["content_type_params"]),
         "PROBLEM: multipart/signed (pkcs7-signature, sha-256) with the signature part missing",
         expect("accettazione", "accettazione", "accettazione", ID, acc, refers_to=bare(L["msgid"]),
                problems=["multipart/signed has 1 body parts instead of 2"]), sign=None)

    # 48 consegna not among destinatari
    x = daticert("avvenuta-consegna", "nessuno", L, P2["name"], cons, ID, ricevuta="sintetica",
                 consegna="altro.ufficio@pec.fornitore.test")
    emit("48-problem-consegna-not-a-destinatario.eml",
         receipt("avvenuta-consegna", L, cons, ID, P2, SENDER, 48, x.encode(), "CONSEGNA: ",
                 consegna="altro.ufficio@pec.fornitore.test"),
         "PROBLEM: daticert consegna is not among its destinatari",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID, cons,
                refers_to=bare(L["msgid"]), problems=["is not among its destinatari"]))

    # 49 non-accettazione carrying the original
    x = daticert("non-accettazione", "altro", L2, P1["name"], w_aug, ID2,
                 errore_esteso="Errore formale: destinatario non presente nelle intestazioni")
    emit("49-problem-non-accettazione-with-original.eml",
         receipt("non-accettazione", L2, w_aug, ID2, P1, SENDER, 49, x.encode(),
                 "AVVISO DI NON ACCETTAZIONE: ", errore_txt=err2, postacert=original(L2, ID2)),
         "PROBLEM: avviso di non accettazione that carries the original message",
         expect("non-accettazione", "non-accettazione", "non-accettazione", ID2, w_aug,
                refers_to=bare(L2["msgid"]), problems=["non-accettazione must not carry the original message"]))

    # 50 receipt without daticert.xml
    emit("50-problem-no-daticert.eml",
         receipt("accettazione", L, acc, ID, P1, SENDER, 50, None, "ACCETTAZIONE: "),
         "PROBLEM: accettazione without daticert.xml",
         expect("accettazione", "accettazione", daticert=False, refers_to=bare(L["msgid"]),
                problems=["accettazione without daticert.xml"]))

    # 51 anomaly envelope without the wrapped message
    emit("51-problem-anomalia-without-original.eml",
         envelope(L16, w_aug, None, 51, None, None, kind="anomalia", to=SENDER,
                  tipo_ricevuta_header=None, subject="ANOMALIA MESSAGGIO: " + L16["subject"],
                  extra=[("Message-ID", L16["msgid"])],
                  errore_txt="il messaggio non è un messaggio di posta certificata"),
         "PROBLEM: anomaly envelope without the wrapped message",
         expect("anomalia", None, daticert=False,
                problems=["anomaly envelope without the wrapped message"]))

    # ------------------------------------------------------------------ large
    big = [("planimetrie_lotto_2.pdf", "application/pdf", fake_pdf("planimetrie", 220_000))]
    L60 = letter("Prot. 130/2025 - Planimetrie lotto 2",
                 "<gw-20250113-0060.b16b16@gateway.comune.example.it>", w_jan, to=[R_FORNITORE],
                 attachments=big)
    ID60 = identificativo(w_jan, 60)
    x = daticert("avvenuta-consegna", "nessuno", L60, P2["name"], cons, ID60, ricevuta="completa",
                 consegna=R_FORNITORE)
    emit("60-avvenuta-consegna-completa-large.eml",
         receipt("avvenuta-consegna", L60, cons, ID60, P2, SENDER, 60, x.encode(), "CONSEGNA: ",
                 postacert=original(L60, ID60), consegna=R_FORNITORE),
         "ricevuta di avvenuta consegna completa of about 300 KB (220 KB PDF in postacert.eml), "
         "for benchmarks",
         expect("avvenuta-consegna", "avvenuta-consegna", "avvenuta-consegna", ID60, cons,
                refers_to=bare(L60["msgid"])))


def build_broken():
    BROKEN.mkdir(parents=True, exist_ok=True)
    (BROKEN / "01-empty.eml").write_bytes(b"")
    garbage = bytearray()
    i = 0
    while len(garbage) < 4096:
        garbage += hashlib.sha256(b"garbage:%d" % i).digest()
        i += 1
    # Random bytes (starting like a ZIP archive): no "name:" header field anywhere.
    (BROKEN / "02-binary-garbage.eml").write_bytes(b"PK\x03\x04\x14\x00" + bytes(garbage[:4000]))
    (BROKEN / "03-blank-lines.eml").write_bytes(b"\r\n\r\n\r\n")
    # Plain text without a single header field (no colon at all).
    (BROKEN / "04-text-without-headers.eml").write_bytes(
        "Questo file non è un messaggio di posta elettronica\r\n"
        "e non contiene alcuna intestazione\r\n\r\nSolo testo.\r\n".encode("utf-8"))


def main():
    SYN.mkdir(parents=True, exist_ok=True)
    for old in SYN.glob("*.eml"):
        old.unlink()
    build()
    build_broken()
    manifest = {
        "comment": "Generated by scripts/make-synthetic-fixtures.py; see that script and "
                   "fixtures/README.md. 'expect' is computed independently of the Rust code "
                   "(data in UTC by Python); tests/golden.rs checks it against inspect.",
        "files": MANIFEST,
    }
    (SYN / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    print("wrote %d synthetic messages and 4 broken files" % len(MANIFEST))


if __name__ == "__main__":
    main()
