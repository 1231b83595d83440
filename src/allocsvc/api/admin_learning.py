"""Admin RPCs of learning: TrainClusters, GetClusteringStatus, TrainEmbeddings, FindSimilarUsers."""

from __future__ import annotations

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.api.errors import maps_errors
from allocsvc.errors import FailedPrecondition
from allocsvc.learning.service import Job, Learning

Context = grpc.aio.ServicerContext
DEFAULT_SIMILAR = 10


def job_to_pb(job: Job) -> pb.LearningJob:
    return pb.LearningJob(
        job_id=job.id,
        kind=job.kind.value,
        state=job.state.value,
        reason=job.reason,
        done=job.done,
        total=job.total,
        message=job.message,
        version=job.version,
        started_unix_ms=job.started_ms,
        finished_unix_ms=job.finished_ms,
    )


class LearningAdminMixin:
    """Mixed into AdminServicer; `bind_learning` gives it the server's Learning."""

    _learning: Learning | None = None

    def bind_learning(self, learning: Learning) -> None:
        self._learning = learning

    def _learning_or_fail(self) -> Learning:
        if self._learning is None:
            raise FailedPrecondition("learning is not available in this server")
        return self._learning

    @maps_errors
    async def TrainClusters(
        self,
        request: pb.TrainClustersRequest,
        context: Context[pb.TrainClustersRequest, pb.LearningJob],
    ) -> pb.LearningJob:
        learning = self._learning_or_fail()
        return job_to_pb(learning.train_clusters(use_embeddings=request.use_embeddings))

    @maps_errors
    async def GetClusteringStatus(
        self,
        request: pb.GetClusteringStatusRequest,
        context: Context[pb.GetClusteringStatusRequest, pb.ClusteringStatus],
    ) -> pb.ClusteringStatus:
        learning = self._learning_or_fail()
        status = learning.status()
        job = learning.job(request.job_id) if request.job_id else status.latest_job
        reply = pb.ClusteringStatus(
            state="none",
            stale=status.stale,
            age_days=status.age_days,
            drift_threshold=learning.clustering.drift_threshold,
            retrain_scheduled=status.retrain_scheduled,
        )
        if job is not None:
            reply.job.CopyFrom(job_to_pb(job))
        if status.model is None:
            if status.latest_job is not None and status.latest_job.state.value == "running":
                reply.state = "training"
            return reply
        model = status.model.model
        metrics = model.metrics
        reply.state = "deployed"
        reply.version = status.model.version
        reply.k = model.k
        reply.samples = model.samples
        reply.silhouette = float(metrics.get("silhouette", 0.0))
        reply.davies_bouldin = float(metrics.get("davies_bouldin", 0.0))
        reply.calinski_harabasz = float(metrics.get("calinski_harabasz", 0.0))
        reply.candidates.extend(
            pb.ClusterCandidate(
                k=int(c["k"]),
                silhouette=c["silhouette"],
                davies_bouldin=c["davies_bouldin"],
                calinski_harabasz=c["calinski_harabasz"],
            )
            for c in metrics.get("candidates", [])
        )
        reply.cluster_sizes.extend(int(s) for s in metrics.get("cluster_sizes", []))
        reply.feature_names.extend(model.feature_names)
        reply.trained_unix_ms = model.trained_at_ms
        reply.embedding_version = model.embedding_version
        if status.drift is not None:
            reply.drift = status.drift.drift
            reply.drift_measured = True
            reply.drift_by_feature.update(status.drift.per_feature)
        return reply

    @maps_errors
    async def TrainEmbeddings(
        self,
        request: pb.TrainEmbeddingsRequest,
        context: Context[pb.TrainEmbeddingsRequest, pb.LearningJob],
    ) -> pb.LearningJob:
        job = self._learning_or_fail().train_embeddings(
            epochs=request.epochs,
            loss=request.loss,
            labels=request.labels,
            fine_tune=request.fine_tune,
        )
        return job_to_pb(job)

    @maps_errors
    async def FindSimilarUsers(
        self,
        request: pb.FindSimilarUsersRequest,
        context: Context[pb.FindSimilarUsersRequest, pb.FindSimilarUsersResponse],
    ) -> pb.FindSimilarUsersResponse:
        learning = self._learning_or_fail()
        found = learning.find_similar(request.user_id, request.k or DEFAULT_SIMILAR)
        return pb.FindSimilarUsersResponse(
            users=[pb.SimilarUser(user_id=u.user_id, similarity=u.score) for u in found],
            model_version=learning.embedding_version,
        )
