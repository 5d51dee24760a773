#!/usr/bin/env python3
"""The origin of the local stack and of the proxy tests: serves files from a directory
under /files/ (and /safe/files/) and answers uploads with their size and SHA-256, over HTTP
or HTTPS. Standard library only."""
import hashlib
import http.server
import os
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root = "."

    def log_message(self, fmt, *args):
        sys.stderr.write("upstream: " + fmt % args + "\n")

    def reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        for prefix in ("/files/", "/safe/files/"):
            if path.startswith(prefix):
                name = os.path.basename(path[len(prefix):])
                full = os.path.join(self.root, name)
                if name and os.path.isfile(full):
                    with open(full, "rb") as f:
                        return self.reply(200, f.read(), "application/octet-stream")
        self.reply(404, b"no such file\n")

    def read_body(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunk = self.rfile.read(n)
                self.rfile.readline()
                digest.update(chunk)
                size += len(chunk)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                left -= len(chunk)
        return size, digest.hexdigest()

    def do_POST(self):
        size, sha = self.read_body()
        self.reply(200, f"received {size} bytes, sha256 {sha}\n".encode())

    do_PUT = do_POST


if __name__ == "__main__":
    # upstream.py PORT ROOT [CERT KEY]: with a certificate and key, serves HTTPS.
    port, Handler.root = int(sys.argv[1]), sys.argv[2]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if len(sys.argv) == 5:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
