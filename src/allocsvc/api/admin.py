"""The Admin service: experiments (other admin RPCs arrive with their features)."""

from __future__ import annotations

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.insights import Insights
from allocsvc.allocation.service import AllocationService
from allocsvc.api import convert
from allocsvc.api.admin_learning import LearningAdminMixin
from allocsvc.api.admin_regions import AdminRegionsMixin
from allocsvc.api.errors import maps_errors
from allocsvc.errors import InvalidRequest
from allocsvc.hierarchy import FORMATS, render

Context = grpc.aio.ServicerContext
MAX_PAGE_SIZE = 1000


class AdminServicer(LearningAdminMixin, AdminRegionsMixin, pb_grpc.AdminServicer):
    def __init__(self, service: AllocationService, insights: Insights) -> None:
        self._service = service
        self._insights = insights

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

    # Segmentation -----------------------------------------------------------------------

    @maps_errors
    async def GetSegmentationConfig(
        self,
        request: pb.GetSegmentationConfigRequest,
        context: Context[pb.GetSegmentationConfigRequest, pb.SegmentationConfig],
    ) -> pb.SegmentationConfig:
        experiment = self._service.get_experiment(_experiment_id(request.experiment_id))
        return convert.segmentation_to_pb(experiment.segmentation)

    @maps_errors
    async def UpdateSegmentationConfig(
        self,
        request: pb.UpdateSegmentationConfigRequest,
        context: Context[pb.UpdateSegmentationConfigRequest, pb.SegmentationConfig],
    ) -> pb.SegmentationConfig:
        key = _experiment_id(request.experiment_id)
        segmentation = convert.segmentation_from_pb(request.config)
        updated = await self._service.update_experiment(key, {"segmentation": segmentation})
        return convert.segmentation_to_pb(updated.segmentation)

    @maps_errors
    async def GetEligibility(
        self,
        request: pb.GetEligibilityRequest,
        context: Context[pb.GetEligibilityRequest, pb.GetEligibilityResponse],
    ) -> pb.GetEligibilityResponse:
        key = _experiment_id(request.experiment_id)
        found = await self._insights.eligibility(key)
        return pb.GetEligibilityResponse(
            eligible=found.eligible,
            average_daily_visitors=found.average_daily_visitors,
            threshold=found.threshold,
            recommendation=convert.recommendation_to_pb(found.recommendation, key),
            reason=found.reason,
        )

    @maps_errors
    async def ListSegments(
        self,
        request: pb.ListSegmentsRequest,
        context: Context[pb.ListSegmentsRequest, pb.ListSegmentsResponse],
    ) -> pb.ListSegmentsResponse:
        if request.page_size < 0:
            raise InvalidRequest("page_size", "must not be negative")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        segments = self._insights.segments(_experiment_id(request.experiment_id))
        # The page token is the last segment key of the previous page, prefixed so that the
        # global segment's empty key is a valid token too.
        if request.page_token:
            if not request.page_token.startswith("k:"):
                raise InvalidRequest("page_token", "not a token this server gave")
            after = request.page_token[2:]
            segments = [s for s in segments if s.segment_key > after]
        page = segments[:size]
        token = f"k:{page[-1].segment_key}" if len(segments) > size else ""
        return pb.ListSegmentsResponse(segments=convert.segments_to_pb(page), next_page_token=token)

    @maps_errors
    async def ListRecommendations(
        self,
        request: pb.ListRecommendationsRequest,
        context: Context[pb.ListRecommendationsRequest, pb.ListRecommendationsResponse],
    ) -> pb.ListRecommendationsResponse:
        found = await self._insights.recommendations(
            request.experiment_id or None, request.status or None
        )
        return pb.ListRecommendationsResponse(
            recommendations=[
                convert.stored_recommendation_to_pb(
                    r, self._service.experiment_by_handle(r.handle).key
                )
                for r in found
            ]
        )

    @maps_errors
    async def AcceptRecommendation(
        self,
        request: pb.AcceptRecommendationRequest,
        context: Context[pb.AcceptRecommendationRequest, pb.Recommendation],
    ) -> pb.Recommendation:
        return await self._decide(request.recommendation_id, accept=True)

    @maps_errors
    async def DismissRecommendation(
        self,
        request: pb.DismissRecommendationRequest,
        context: Context[pb.DismissRecommendationRequest, pb.Recommendation],
    ) -> pb.Recommendation:
        return await self._decide(request.recommendation_id, accept=False)

    async def _decide(self, recommendation_id: str, *, accept: bool) -> pb.Recommendation:
        if not recommendation_id:
            raise InvalidRequest("recommendation_id", "must not be empty")
        decided = await self._insights.decide(recommendation_id, accept, ADMIN_ACTOR)
        key = self._service.experiment_by_handle(decided.handle).key
        return convert.stored_recommendation_to_pb(decided, key)

    # Hierarchy --------------------------------------------------------------------------

    @maps_errors
    async def RebuildTree(
        self,
        request: pb.RebuildTreeRequest,
        context: Context[pb.RebuildTreeRequest, pb.RebuildTreeResponse],
    ) -> pb.RebuildTreeResponse:
        built = await self._insights.rebuild_tree(_experiment_id(request.experiment_id))
        return pb.RebuildTreeResponse(
            summary=convert.tree_summary_to_pb(built.tree), version=built.version
        )

    @maps_errors
    async def GetTree(
        self, request: pb.GetTreeRequest, context: Context[pb.GetTreeRequest, pb.GetTreeResponse]
    ) -> pb.GetTreeResponse:
        key = _experiment_id(request.experiment_id)
        fmt = request.format or "json"
        if fmt not in FORMATS:
            raise InvalidRequest("format", f"one of {', '.join(FORMATS)}")
        built = await self._insights.tree(key)
        return pb.GetTreeResponse(
            format=fmt,
            content=render(built.tree, fmt),
            summary=convert.tree_summary_to_pb(built.tree),
            cascade=convert.cascade_to_pb(self._insights.cascade(key)),
        )

    # Analytics --------------------------------------------------------------------------

    @maps_errors
    async def AnalyzeSegments(
        self,
        request: pb.AnalyzeSegmentsRequest,
        context: Context[pb.AnalyzeSegmentsRequest, pb.AnalyzeSegmentsResponse],
    ) -> pb.AnalyzeSegmentsResponse:
        if not (request.alpha == 0 or 0 < request.alpha < 1):
            raise InvalidRequest("alpha", "must lie strictly between 0 and 1")
        analysis = self._insights.analyze(
            _experiment_id(request.experiment_id), request.min_allocations, request.alpha
        )
        return convert.analysis_to_pb(analysis)

    @maps_errors
    async def CalculateSampleSize(
        self,
        request: pb.CalculateSampleSizeRequest,
        context: Context[pb.CalculateSampleSizeRequest, pb.CalculateSampleSizeResponse],
    ) -> pb.CalculateSampleSizeResponse:
        if not (request.daily_traffic >= 0 and request.daily_traffic < float("inf")):
            raise InvalidRequest("daily_traffic", "must be a finite number >= 0")
        size, plan = await self._insights.sample_size(
            convert.sample_size_query(request),
            request.daily_traffic,
            request.experiment_id,
            request.horizon_days,
        )
        return convert.sample_size_to_pb(size, plan)

    @maps_errors
    async def ValidateExperiment(
        self,
        request: pb.ValidateExperimentRequest,
        context: Context[pb.ValidateExperimentRequest, pb.ValidateExperimentResponse],
    ) -> pb.ValidateExperimentResponse:
        return convert.validation_to_pb(
            self._insights.validate(_experiment_id(request.experiment_id))
        )


# Who admin changes are attributed to in the audit log until admin credentials exist.
ADMIN_ACTOR = "admin"


def _experiment_id(value: str) -> str:
    if not value:
        raise InvalidRequest("experiment_id", "must not be empty")
    return value
