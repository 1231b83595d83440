"""The Admin service: experiments (other admin RPCs arrive with their features)."""

from __future__ import annotations

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.errors import maps_errors
from allocsvc.errors import InvalidRequest

Context = grpc.aio.ServicerContext
MAX_PAGE_SIZE = 1000


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, service: AllocationService) -> None:
        self._service = service

    @maps_errors
    async def CreateExperiment(
        self,
        request: pb.CreateExperimentRequest,
        context: Context[pb.CreateExperimentRequest, pb.Experiment],
    ) -> pb.Experiment:
        created = await self._service.create_experiment(
            convert.experiment_from_pb(request.experiment)
        )
        return convert.experiment_to_pb(created)

    @maps_errors
    async def GetExperiment(
        self,
        request: pb.GetExperimentRequest,
        context: Context[pb.GetExperimentRequest, pb.Experiment],
    ) -> pb.Experiment:
        if not request.experiment_id:
            raise InvalidRequest("experiment_id", "must not be empty")
        return convert.experiment_to_pb(self._service.get_experiment(request.experiment_id))

    @maps_errors
    async def ListExperiments(
        self,
        request: pb.ListExperimentsRequest,
        context: Context[pb.ListExperimentsRequest, pb.ListExperimentsResponse],
    ) -> pb.ListExperimentsResponse:
        status = (
            None
            if request.status == pb.EXPERIMENT_STATUS_UNSPECIFIED
            else convert.status_from_pb(request.status)
        )
        if request.page_size < 0:
            raise InvalidRequest("page_size", "must not be negative")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        experiments = self._service.list_experiments(status)
        # The page token is the id of the last experiment of the previous page.
        if request.page_token:
            experiments = [e for e in experiments if e.key > request.page_token]
        page = experiments[:size]
        token = page[-1].key if len(experiments) > size else ""
        return pb.ListExperimentsResponse(
            experiments=[convert.experiment_to_pb(e) for e in page], next_page_token=token
        )

    @maps_errors
    async def UpdateExperiment(
        self,
        request: pb.UpdateExperimentRequest,
        context: Context[pb.UpdateExperimentRequest, pb.Experiment],
    ) -> pb.Experiment:
        changes = convert.changes_from_update(request)
        updated = await self._service.update_experiment(request.experiment.id, changes)
        return convert.experiment_to_pb(updated)
