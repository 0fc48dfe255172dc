"""Minimal pynetdicom Storage SCP: the pure-Python floor for C-STORE ingest.

Accepts every storage SOP class with every transfer syntax pynetdicom knows (plus
Verification, so ``echoscu`` can probe it) and writes each received dataset, as a Part-10
file with its file meta, to ``OUT_DIR/<SOPInstanceUID>.dcm`` before answering Success.
Nothing else: no parsing beyond what pynetdicom does, no index.

Usage: ``python -m bench.pynetdicom_scp --port 11113 --out DIR [--aet PYNETDICOM]``
``[--max-pdu N] [--chunked] [--no-nodelay]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer


def _enable_nodelay_on_accept() -> None:
    """Set TCP_NODELAY on every accepted socket (pynetdicom 3.0 leaves Nagle on)."""
    original = ThreadedAssociationServer.get_request

    def get_request(self: AssociationServer) -> tuple[socket.socket, tuple[str, int]]:
        client, address = original(self)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    ThreadedAssociationServer.get_request = get_request  # type: ignore[method-assign]


def _store_handler(out_dir: Path, chunked: bool) -> Any:
    """A C-STORE handler writing each dataset to ``out_dir``; returns status 0x0000."""

    def handle_store(event: evt.Event) -> int:
        uid = event.request.AffectedSOPInstanceUID  # type: ignore[union-attr]
        target = out_dir / f"{uid}.dcm"
        if chunked:
            # pynetdicom already streamed the dataset to a temp file: move it into place.
            shutil.move(event.dataset_path, target)
            return 0x0000
        with open(target, "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    return handle_store


def build_ae(aet: str, max_pdu: int) -> AE:
    """An AE accepting all storage contexts x all transfer syntaxes, plus Verification."""
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = max_pdu
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    ae.add_supported_context(Verification)
    ae.maximum_associations = 64
    return ae


def _wake(signum: int, frame: FrameType | None) -> None:
    """A signal handler that only lets :func:`signal.pause` return."""


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until SIGTERM/SIGINT, and exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for received files")
    parser.add_argument("--aet", default="PYNETDICOM")
    parser.add_argument("--max-pdu", type=int, default=16382,
                        help="maximum PDU to receive (0 = unlimited); pynetdicom default 16382")
    parser.add_argument("--chunked", action="store_true",
                        help="stream datasets to a temp file (STORE_RECV_CHUNKED_DATASET)")
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle on")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.chunked:
        _config.STORE_RECV_CHUNKED_DATASET = True
    if not args.no_nodelay:
        _enable_nodelay_on_accept()
    ae = build_ae(args.aet, args.max_pdu)
    ae.start_server(  # non-blocking: serves from its own thread
        (args.host, args.port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, _store_handler(args.out, args.chunked))],
    )
    signal.signal(signal.SIGTERM, _wake)
    signal.signal(signal.SIGINT, _wake)
    signal.pause()  # returns once either has arrived (and its handler ran)
    # Each handler wrote its file before answering, so nothing is pending once the senders
    # are done; socketserver's shutdown() would wait up to its 0.5 s poll for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
