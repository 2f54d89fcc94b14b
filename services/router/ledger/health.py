"""The usage ledger on the router's standard gRPC health service.

``tollgate.router.v1.Ledger`` is SERVING while the dead-letter stream is empty and NOT_SERVING while it
holds entries, so a health probe or alert sees rows the ledger refused; the router's own services ("" and
RouterService/AdminService) stay SERVING either way: requests are still served and billed. The count
itself comes with every Check of that name as trailing metadata ``tollgate-dead-letters: N``
(``grpcurl -v -d '{"service": "tollgate.router.v1.Ledger"}' … grpc.health.v1.Health/Check``).
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from libs.grpc_server import DetailedHealthServicer, GrpcServer

LEDGER_HEALTH_SERVICE = "tollgate.router.v1.Ledger"


class LedgerHealth:
    """Receives the dead-letter count (``publish``) before or after the server exists (``attach``)."""

    def __init__(self) -> None:
        self._health: DetailedHealthServicer | None = None
        self.count: int | None = None

    async def publish(self, count: int) -> None:
        self.count = count
        if self._health is not None:
            self._health.set_detail(LEDGER_HEALTH_SERVICE, "dead-letters", str(count))
            await self._health.set(LEDGER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if count == 0
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def attach(self, server: GrpcServer) -> None:
        self._health = server.health
        if self.count is None:  # not checked yet (Redis slow or down): say so rather than NOT_FOUND
            await self._health.set(LEDGER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.UNKNOWN)
        if self.count is not None:  # (also when a check finished while the line above was awaited)
            await self.publish(self.count)
