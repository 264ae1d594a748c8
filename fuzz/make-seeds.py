#!/usr/bin/env python3
"""Regenerates fuzz/seeds/ from the repository's fixtures (run from fuzz/).

    python3 make-seeds.py [--shared /work/shared]

- seeds/classify/    header blocks of every fixtures/**/*.eml (classify
                     reads the top-level headers only);
- seeds/take_apart/  every fixtures/**/*.eml up to 64 KiB, plus two messages
                     signed here with a throwaway self-signed certificate
                     (detached multipart/signed and opaque pkcs7-mime), since
                     the synthetic fixtures are unsigned;
- seeds/verify/      the signed ones among those;
- seeds/daticert/    every daticert.xml part of the fixtures, the DATICERT
                     blocks of shared/fixtures/public/ANALYSIS.txt (personal
                     addresses replaced), the Namirial sample, and hand-written
                     documents covering encodings, DOCTYPE, CDATA, entities.

Needs the `openssl` command for the signed seeds (skipped without it).
"""

import argparse
import email
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from email import policy

MAX_LEN = 65536

ap = argparse.ArgumentParser()
ap.add_argument("--shared", default="/work/shared")
args = ap.parse_args()

for t in ("classify", "take_apart", "verify", "daticert"):
    shutil.rmtree(f"seeds/{t}", ignore_errors=True)
    os.makedirs(f"seeds/{t}")

emls = sorted(glob.glob("../fixtures/**/*.eml", recursive=True))


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


# --- classify / take_apart / verify -----------------------------------------
for f in emls:
    data = open(f, "rb").read()
    base = os.path.relpath(f, "../fixtures").replace("/", "_")[:-4]
    m = re.search(rb"\r?\n\r?\n", data)
    write(f"seeds/classify/{base}.eml", data[: m.end()] if m else data)
    if len(data) <= MAX_LEN:
        write(f"seeds/take_apart/{base}.eml", data)
        if re.search(rb"multipart/signed|pkcs7-mime", data, re.I):
            write(f"seeds/verify/{base}.eml", data)


def signed_seeds():
    if shutil.which("openssl") is None:
        print("openssl not found: no signed seeds")
        return
    src = open("../fixtures/synthetic/01-accettazione.eml", "rb").read()
    src = src.replace(b"\r\n", b"\n")
    hdrs, body = src.split(b"\n\n", 1)
    top, mime, cur = [], [], None
    for line in hdrs.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            cur.append(line)
            continue
        cur = mime if line.lower().startswith((b"content-type", b"mime-version")) else top
        cur.append(line)
    with tempfile.TemporaryDirectory() as d:
        entity = os.path.join(d, "entity.txt")
        key, cert = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
        write(entity, b"\n".join(m for m in mime if not m.lower().startswith(b"mime-version"))
              + b"\n\n" + body)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
             "-out", cert, "-days", "3650", "-subj",
             "/CN=Posta Certificata Example/O=Example PEC/C=IT",
             "-addext", "subjectAltName=email:posta-certificata@pec.example.it"],
            check=True, capture_output=True)
        for name, extra in (("detached", ["-md", "sha256"]), ("opaque", ["-nodetach"])):
            out = subprocess.run(
                ["openssl", "smime", "-sign", "-in", entity, "-signer", cert, "-inkey", key,
                 *extra], check=True, capture_output=True).stdout
            msg = b"\n".join(top) + b"\n" + out
            for t in ("take_apart", "verify"):
                write(f"seeds/{t}/hand-signed-{name}.eml", msg)


signed_seeds()

# --- daticert ----------------------------------------------------------------
seen = set()


def save_xml(name, data):
    h = hashlib.sha1(data).hexdigest()[:10]
    if h in seen or not data.strip():
        return
    seen.add(h)
    write(f"seeds/daticert/{name}-{h}.xml", data)


def anonymise(s):
    return (s.replace("l.battistini@pec.it", "mittente@pec.example.it")
             .replace("thinkstudio@pec.it", "destinatario@pec.example.it")
             .replace("elbati-Vostro-3550", "host.example"))


for f in emls:
    msg = email.message_from_binary_file(open(f, "rb"), policy=policy.compat32)
    for part in msg.walk():
        fn = part.get_filename()
        if fn and fn.lower() == "daticert.xml":
            try:
                data = part.get_payload(decode=True)
            except Exception:
                continue
            if data:
                save_xml("fx-" + os.path.basename(f)[:-4], data)

analysis = os.path.join(args.shared, "fixtures/public/ANALYSIS.txt")
if os.path.exists(analysis):
    lines = open(analysis, encoding="utf-8", errors="replace").read().split("\n")
    i = n = 0
    while i < len(lines):
        if lines[i].strip() == "DATICERT:":
            i += 1
            block = []
            while i < len(lines) and lines[i].startswith("   "):
                block.append(lines[i][3:])
                i += 1
            n += 1
            save_xml(f"analysis{n}", anonymise("\n".join(block) + "\n").encode())
        else:
            i += 1

namirial = os.path.join(args.shared, "fixtures/public/_extracted/namirial-2024-busta-daticert.xml")
if os.path.exists(namirial):
    save_xml("namirial-2024", open(namirial, "rb").read())

SPEC_EXAMPLE = """<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="avvenuta-consegna" errore="nessuno">
  <intestazione>
    <mittente>ufficio.protocollo@pec.comune.example.it</mittente>
    <destinatari tipo="certificato">fornitore@pec.example.it</destinatari>
    <destinatari tipo="esterno">info@example.com</destinatari>
    <risposte>ufficio.protocollo@pec.comune.example.it</risposte>
    <oggetto>Prot. 123/2025 - Richiesta documentazione</oggetto>
  </intestazione>
  <dati>
    <gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
    <data zona="+0100"><giorno>13/11/2025</giorno><ora>16:39:27</ora></data>
    <identificativo>opec21010.20251113163926.01838.310.1.63@pec.aruba.it</identificativo>
    <msgid>&lt;gw-7f3c2a@gateway.comune.example.it&gt;</msgid>
    <ricevuta tipo="completa" />
    <consegna>fornitore@pec.example.it</consegna>
  </dati>
</postacert>
"""
d = "seeds/daticert/"
base = SPEC_EXAMPLE
write(d + "hand-spec-3.3.xml", base.encode())
write(d + "hand-utf16le-bom.xml", b"\xff\xfe" + base.replace("UTF-8", "UTF-16").encode("utf-16-le"))
write(d + "hand-utf16be-bom.xml", b"\xfe\xff" + base.replace("UTF-8", "UTF-16").encode("utf-16-be"))
write(d + "hand-utf8-bom.xml", b"\xef\xbb\xbf" + base.encode())
write(d + "hand-iso-8859-1.xml", base.replace("UTF-8", "ISO-8859-1")
      .replace("Richiesta documentazione", "Citt\u00e0 perch\u00e9").encode("latin-1"))
write(d + "hand-windows-1252.xml", base.replace("UTF-8", "windows-1252")
      .replace("Richiesta documentazione", "Citt\u00e0 \u201cperch\u00e9\u201d \u20ac").encode("cp1252"))
write(d + "hand-errore-consegna.xml", b"""<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="errore-consegna" errore="no-dest">
<intestazione><mittente>a@pec.example.it</mittente><destinatari tipo="certificato">b@pec.example.it</destinatari><risposte>a@pec.example.it</risposte><oggetto><![CDATA[Prot. <1> & "2"]]></oggetto></intestazione>
<dati><gestore-emittente>X &amp; Y S.p.A.</gestore-emittente><data zona="-02:30"><giorno>29/02/2024</giorno><ora>23:59:59</ora></data>
<identificativo>opec1.2.3@pec.example.it</identificativo><msgid>&lt;m@x&gt;</msgid><consegna>B@PEC.example.it</consegna>
<errore-esteso>5.1.1 - Utente non trovato &#233;&#x20AC;</errore-esteso></dati></postacert>
""")
write(d + "hand-presa-in-carico.xml", b"""<postacert tipo="presa-in-carico"><dati><data zona="+0200"><giorno>1/1/2000</giorno><ora>0:0:0</ora></data><identificativo>i</identificativo><ricezione>a@b</ricezione><ricezione>c@d</ricezione></dati><intestazione><destinatari>x@y</destinatari></intestazione></postacert>""")
write(d + "hand-doctype-subset.xml", b"""<?xml version="1.0"?>
<?xml-stylesheet type="text/xsl" href="postacert.xsl"?>
<!DOCTYPE postacert [ <!ENTITY e "expanded"> <!ENTITY x SYSTEM "file:///etc/passwd"> ]>
<!-- comment -->
<postacert tipo="rilevazione-virus" errore="virus"><dati><data zona="+0100"><giorno>13/11/2018</giorno><ora>16:39:26</ora></data><identificativo>&e;</identificativo></dati></postacert>""")
write(d + "hand-ns-empty.xml", b"""<p:postacert xmlns:p="urn:x" p:tipo="accettazione"/>""")

for t in ("classify", "take_apart", "verify", "daticert"):
    print(t, len(os.listdir(f"seeds/{t}")))
