"""The DICOM network node (PS3.7/PS3.8 via pynetdicom): C-ECHO and C-STORE here, C-FIND,
C-MOVE and C-GET in :mod:`gateway.qr`, Storage Commitment (N-ACTION, N-EVENT-REPORT) in
:mod:`gateway.commitment`; translation only.

Every received data set is streamed by pynetdicom into a file in the storage's staging area
(``STORE_RECV_CHUNKED_DATASET``: preamble, file meta, then the data set bytes exactly as they
came off the wire) and handed to :meth:`gateway.ingest.Ingest.store_file`, which moves it into
place. The response status is whatever the single write path decided (PS3.4 B.2.3).

Association policy: the called AE title must be ours (``dimse.check_called_ae``) and, when
``dimse.allowed_callers`` is set, the calling AE title must be in it; otherwise the association
is rejected (A-ASSOCIATE-RJ, permanent, "called/calling AE title not recognised").
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.transport import ThreadedAssociationServer

from gateway import commitment, qr, qr_lean, reactor, receiver
from gateway.cohort import Cohorts, cohort_of_ae_title
from gateway.config import Settings
from gateway.ingest import Ingest

log = logging.getLogger("gateway.dimse")

#: How often a listening server's loop looks whether it was asked to stop: a stop (SIGTERM,
#: a restart) waits up to this long for each listener (socketserver's default is 0.5 s).
SHUTDOWN_POLL_SECONDS = 0.05

_EXPLICIT_LE, _IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def configure_pynetdicom() -> None:
    """Process-wide settings for a receiver: stream data sets to disk, keep logs free of PHI."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    # C-STORE sub-operations (C-MOVE, C-GET) of a stored file stream its bytes from disk.
    _config.STORE_SEND_CHUNKED_DATASET = True
    reactor.install()  # event-driven waits instead of 1 ms polling (see gateway.reactor)
    # see ReceiveSink for why; pynetdicom 3.0.x looks the name up in this module at each message
    setattr(dimse_messages, "NamedTemporaryFile", receiver.ReceiveSink)  # noqa: B010
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    # Values are stored as received; validating them while indexing only costs time and noise.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class GatewayAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the socket options a fast receiver needs.

    * ``TCP_NODELAY`` on accepted sockets: C-STORE-RSP is a small message the sender waits
      for, and Nagle + delayed ACK would add ~40 ms to every instance;
    * large socket buffers for streaming multi-megabyte data sets.
    """

    daemon_threads = True
    #: Set by DimseNode: serves an accepted socket itself, or returns False to hand it over.
    route: Any = None

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        super().server_bind()

    def service_actions(self) -> None:
        """Nothing between two accepts. pynetdicom runs a full :func:`gc.collect` every
        60th turn of the accept loop (every 3 s here, idle or not), for its own association
        threads; a full collection held the GIL for up to 120 ms, stalling every association
        of the process. The collector's own schedule collects those threads' cycles."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Look at each association request in its own thread: storage-only associations go
        to the lean receiver (:mod:`gateway.receiver`), everything else to pynetdicom."""
        thread = threading.Thread(target=self._route, args=(request, client_address),
                                  name=f"assoc-{client_address[0]}:{client_address[1]}",
                                  daemon=True)
        thread.start()

    def _route(self, request: Any, client_address: Any) -> None:
        try:
            if self.route is not None and self.route(request, client_address):
                return
        except Exception:  # never leave a requestor waiting on a socket nobody serves
            log.exception("association from %s:%s could not be routed; closing it",
                          *client_address[:2])
            with contextlib.suppress(OSError):
                request.close()
            return
        request.settimeout(None)
        self.process_request_thread(request, client_address)  # pynetdicom's own handling


class DimseNode:
    """The gateway's DICOM AE: builds the pynetdicom AE and serves it until stopped."""

    def __init__(self, settings: Settings, ingest: Ingest,
                 cohorts: Cohorts | None = None) -> None:
        self.settings = settings
        self.ingest = ingest
        self.cohorts = cohorts
        self.server: ThreadedAssociationServer | None = None
        #: Set by ``serve`` with receiver processes: hands an association to the least busy
        #: process, or returns False to serve it here.
        self.hand_off: Callable[[socket.socket, tuple[str, int]], bool] | None = None
        configure_pynetdicom()
        # Received data sets land in the storage's staging area, so moving them into place is
        # a rename, not a copy.
        receiver.ReceiveSink.stage_into(ingest.storage)
        self.store = receiver.storing_into(ingest)
        self.lean_store = receiver.storing_into(ingest, index_after_response=True)
        self.ae = self._make_ae()
        dimse = settings.dimse
        self.lean_upper_layer = dimse["lean_upper_layer"]
        self.qr = qr.QueryRetrieve(ingest.index, ingest.storage, settings.peers,
                                   dimse["ae_title"], scope=self.scope_of)
        self.find = qr.FindSCP(self.qr)
        self.retrieve = qr.RetrieveSCP(self.qr)
        for model in qr.MODEL_LEVELS:
            self.ae.add_supported_context(model, [_EXPLICIT_LE, _IMPLICIT_LE])
        self.commitment = commitment.CommitmentSCP(
            ingest.index, ingest.storage, settings.peers, ae=self.ae,
            ae_title=dimse["ae_title"],
            storage_classes=set(receiver.STORAGE_CLASSES),
            report_delay=dimse["commitment_report_delay"])
        self.ae.add_supported_context(commitment.SOP_CLASS, [_EXPLICIT_LE, _IMPLICIT_LE])
        #: What only pynetdicom serves: an association proposing it goes there.
        self._pynetdicom_only = {commitment.SOP_CLASS}
        self.policy = receiver.Policy.of(
            dimse, [cx for cx in self.ae.supported_contexts
                    if str(cx.abstract_syntax) not in self._pynetdicom_only],
            maximum_associations=self.ae.maximum_associations,
            also_called=lambda called: self.cohort_of(called) is not None)
        self.lean_qr = qr_lean.LeanQueryRetrieve(
            self.qr, network_timeout=dimse["network_timeout"], max_pdu=dimse["max_pdu"],
            pending_interval=dimse["pending_interval"])

    def _make_ae(self) -> AE:
        dimse = self.settings.dimse
        ae = AE(ae_title=dimse["ae_title"])
        ae.maximum_pdu_size = dimse["max_pdu"]
        ae.network_timeout = dimse["network_timeout"]
        ae.acse_timeout = 30
        ae.dimse_timeout = dimse["network_timeout"]
        ae.maximum_associations = 64
        # The called AE title is checked in _route: ours, or a cohort's (see scope_of).
        ae.require_called_aet = False
        if dimse["allowed_callers"] is not None:
            ae.require_calling_aet = list(dimse["allowed_callers"])
        for context in receiver.storage_contexts():  # Verification and every Storage class
            ae.add_supported_context(str(context.abstract_syntax), context.transfer_syntax,
                                     scu_role=context.scu_role, scp_role=context.scp_role)
        return ae

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self.find.handle),
            (evt.EVT_C_MOVE, self.retrieve.handle_move),
            (evt.EVT_C_GET, self.retrieve.handle_get),
            (evt.EVT_N_ACTION, self.commitment.handle),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        dimse = self.settings.dimse
        server_class = type("Server", (GatewayAssociationServer,),
                            {"route": self._route})
        server = self.ae.make_server((dimse["host"], dimse["port"]),
                                     evt_handlers=self.handlers(), server_class=server_class)
        self.ae._servers.append(server)  # so server.shutdown() can deregister it
        self.server = server
        thread = threading.Thread(target=server.serve_forever, name="dimse-accept", daemon=True,
                                  kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS})
        thread.start()
        host, port = server.server_address[:2]
        log.info("DICOM listener %s on %s:%s", dimse["ae_title"], host, port)
        return str(host), int(port)

    def cohort_of(self, called_ae_title: str) -> int | None:
        """The cohort a called AE title addresses (``cohorts.ae_prefix`` + id), if it exists."""
        if self.cohorts is None:
            return None
        number = cohort_of_ae_title(self.settings.cohorts["ae_prefix"], called_ae_title)
        if number is None or number not in self.cohorts.ids():
            return None
        return number

    def scope_of(self, called_ae_title: str) -> Any:
        """The SQL scope of queries and retrieves addressed to ``called_ae_title``: None for
        the gateway's own AE title, a cohort's members for its AE title."""
        number = self.cohort_of(called_ae_title.strip())
        if number is None or self.cohorts is None:
            return None
        return self.cohorts.scope(number)

    def _route(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Check the called AE title (ours or a cohort's, else A-ASSOCIATE-RJ when
        ``dimse.check_called_ae``), then serve ``sock`` with the lean Upper Layer (storage,
        verification, query/retrieve) unless it proposes Storage Commitment, which is
        pynetdicom's."""
        try:
            request = receiver.peek_associate_rq(sock, self.policy.acse_timeout)
        except Exception:  # not a well-formed A-ASSOCIATE-RQ: let pynetdicom answer it
            return False
        if request is None:
            return False
        called = str(request.called_ae_title).strip()
        if (called != self.policy.ae_title and self.cohort_of(called) is None
                and self.policy.check_called_ae):
            log.warning("association rejected: called AE title %s is neither %s nor a "
                        "cohort's (calling %s from %s)", called, self.policy.ae_title,
                        str(request.calling_ae_title).strip(), address[0])
            receiver.reject_called_ae(sock)
            return True
        if not self.lean_upper_layer or not receiver.lean_serves(request, self._pynetdicom_only):
            return False
        if (self.hand_off is not None and receiver.storage_only(request)
                and self.hand_off(sock, address)):
            return True  # served by a receiver process (gateway.workers)
        self.serve_lean(sock, address)
        return True

    def serve_lean(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Serve one association on the lean Upper Layer, in the calling thread."""
        receiver.serve_association(sock, address, self.policy, self.lean_store,
                                    self.lean_qr)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting associations, let the open ones finish (up to ``drain_seconds``),
        then abort what is left. An abort before a C-STORE-RSP means the sender re-sends."""
        server = self.server
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + drain_seconds
        self.commitment.stop(timeout=min(5.0, drain_seconds))
        # Connections that never completed association negotiation have nothing in flight.
        while ((any(a.is_established for a in server.active_associations)
                or any(a.established for a in receiver.active_associations()))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        receiver.abort_all()
        for assoc in server.active_associations:
            log.warning("aborting association from %s still open after %.0f s",
                        assoc.requestor.ae_title, drain_seconds)
            assoc.abort()
        self.server = None

    # -- handlers --------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title
        request: Any = event.request  # a C_STORE primitive
        sop_uid = str(request.AffectedSOPInstanceUID)
        status, _comment, _ = self.store(event.dataset_path,
                                         str(event.context.abstract_syntax), sop_uid, calling,
                                         None)
        return status

    def _on_accepted(self, event: evt.Event) -> None:
        log.info("association accepted from %s (%s:%s)", event.assoc.requestor.ae_title,
                 event.assoc.requestor.address, event.assoc.requestor.port)

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association rejected: calling %s called %s from %s",
                    event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title,
                    event.assoc.requestor.address)

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association with %s aborted", event.assoc.requestor.ae_title)
