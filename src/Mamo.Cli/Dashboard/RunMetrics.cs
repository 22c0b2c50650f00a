using Mamo.Data.Kafka;
using Prometheus;

namespace Mamo.Cli.Dashboard;

/// <summary>
/// /metrics of a run in Prometheus text, through prometheus-net: a registry of the run's own (not the global one, so
/// nothing else in the process leaks in), set from <see cref="RunFiles"/> just before each scrape. The values are
/// therefore those of metrics.jsonl: a scrape after a restart reports the same as before it. The process_* metrics
/// are those of the serving process; mamo_process_* are the run's, from its files.
/// </summary>
public sealed class RunMetrics
{
    public const string ContentType = "text/plain; version=0.0.4; charset=utf-8";

    readonly CollectorRegistry registry = Metrics.NewCustomRegistry();
    readonly RunFiles history;
    readonly Gauge step, loss, pairsPerSecond, learningRate, recall, kafkaLag, checkpointStep, residentBytes, gcHeapBytes, cpuSeconds, clusterRound;
    readonly Counter deadLetters, kafkaExpired, restarts;

    public RunMetrics(RunFiles history)
    {
        this.history = history;
        var f = Metrics.WithCustomRegistry(registry);
        step = f.CreateGauge("mamo_step", "Training steps done (the step of the newest train line)");
        loss = f.CreateGauge("mamo_loss", "Loss of the newest logged step, per term; term=total is the weighted sum", "term");
        pairsPerSecond = f.CreateGauge("mamo_pairs_per_second", "Image-text pairs trained per second over the last logging interval");
        learningRate = f.CreateGauge("mamo_learning_rate", "Learning rate of the newest logged step");
        recall = f.CreateGauge("mamo_eval_recall", "Retrieval recall at k of the newest evaluation of each set, as a fraction", "set", "direction", "k");
        deadLetters = f.CreateCounter("mamo_dead_letters_total", "Records that could not be used, by reason", "reason");
        kafkaLag = f.CreateGauge("mamo_kafka_lag", "Records between the consumer's position and the partition's end", "topic", "partition");
        kafkaExpired = f.CreateCounter("mamo_kafka_expired_records_total",
            "Records the broker's retention deleted before the group read them: never trained", "topic", "partition");
        checkpointStep = f.CreateGauge("mamo_checkpoint_last_step", "Step of the newest durable checkpoint");
        residentBytes = f.CreateGauge("mamo_process_resident_memory_bytes", "Resident memory of the training process");
        gcHeapBytes = f.CreateGauge("mamo_process_gc_heap_bytes", "Managed heap of the training process");
        cpuSeconds = f.CreateGauge("mamo_process_cpu_seconds", "CPU time of the training process since it (last) started");
        clusterRound = f.CreateGauge("mamo_cluster_round", "A cluster run's newest committed round (every-step: step)");
        restarts = f.CreateCounter("mamo_process_restarts_total", "Times the run's process started again on the same run folder");
        DotNetStats.Register(registry);
        registry.AddBeforeCollectCallback(Update);
    }

    void Update()
    {
        history.Poll();
        var v = history.Values();
        Set(step, v.Step);
        foreach (var (term, value) in v.Loss) loss.WithLabels(term).Set(value);
        Set(pairsPerSecond, v.PairsPerSecond);
        Set(learningRate, v.LearningRate);
        foreach (var r in v.Recall) recall.WithLabels(r.Set, r.Direction, r.K.ToString()).Set(r.Value);
        foreach (var (reason, count) in v.DeadLetters) deadLetters.WithLabels(reason).IncTo(count);
        foreach (var l in v.KafkaLag) kafkaLag.WithLabels(l.Topic, l.Partition).Set(l.Lag);
        foreach (var (partition, count) in v.KafkaExpired)
        {
            var (topic, part) = KafkaRecords.SplitPartitionKey(partition);
            kafkaExpired.WithLabels(topic, part).IncTo(count);
        }
        Set(checkpointStep, v.CheckpointStep);
        Set(residentBytes, v.ResidentBytes);
        Set(gcHeapBytes, v.GcHeapBytes);
        Set(cpuSeconds, v.CpuSeconds);
        restarts.IncTo(v.ProcessRestarts);
        Set(clusterRound, v.ClusterRound);
    }

    static void Set(Gauge gauge, double? value)
    {
        if (value is { } x) gauge.Set(x);
    }

    public Task WriteAsync(Stream to, CancellationToken ct) => registry.CollectAndExportAsTextAsync(to, ExpositionFormat.PrometheusText, ct);
}
