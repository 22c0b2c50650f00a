using Mamo.Data.Datasets;
using Xunit;
using Mamo.Actors.Pipeline;
using Mamo.Actors.Sources;
using Mamo.Actors.Run;

namespace Mamo.Actors.Tests;

public class PipelineTests
{
    [Fact]
    public void Training_samples_resume_at_a_cursor_and_reshuffle_each_epoch()
    {
        var samples = TrainingSamples.Load("manifest:" + BuiltinDatasets.Ensure(BuiltinDatasets.Emoji).File(BuiltinDatasets.TestSplit),
            seed: 7, maxBytes: 1 << 30, _ => { });
        int n = samples.Count;
        var full = samples.From(0).Take(3 * n).ToList();
        Assert.Equal(Enumerable.Range(0, 3 * n).Select(i => (long)i), full.Select(x => x.Cursor));
        var tail = samples.From(n + 5).Take(n).ToList();
        Assert.Equal(full.Skip(n + 5).Take(n).Select(x => x.Sample.Id), tail.Select(x => x.Sample.Id));
        var epoch0 = full.Take(n).Select(x => x.Sample.Id).ToList();
        var epoch1 = full.Skip(n).Take(n).Select(x => x.Sample.Id).ToList();
        Assert.Equal(epoch0.Order(), epoch1.Order());        // every sample once per epoch
        Assert.NotEqual(epoch0, epoch1);                     // in a new order
    }

    [Fact]
    public async Task The_source_never_runs_more_than_a_few_batches_ahead_of_the_trainer()
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-bp-").FullName;
        try
        {
            const int batch = 4, buffered = 2, parallelism = 2, steps = 8;
            var settings = MamoSettings.Load(null, [
                $"run-dir={runDir}", $"batch-size={batch}", $"max-steps={steps}", "eval.every-steps=0", "checkpoint.every-steps=0",
                $"data.buffered-batches={buffered}", $"data.preprocess-parallelism={parallelism}", "metrics.every-steps=1",
                "source=\"dataset:emoji\""]);
            var worst = 0L;
            TrainingRun? run = null;
            run = new TrainingRun(settings, new StepProgress(step => worst = Math.Max(worst, run!.SamplesRead - step * batch)));
            var finalStep = await run.RunAsync(CancellationToken.None);
            Assert.Equal(steps, finalStep);
            // Ahead of the trainer: the batches buffered and in the teacher/trainer stages, one being grouped,
            // and the samples being preprocessed. 1,730 samples wait in the source; without backpressure they would all be read.
            var bound = batch * (buffered + 3) + parallelism;
            Assert.True(worst > 0 && worst <= bound, $"read {worst} samples ahead of the trainer; bound {bound}");
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }

    sealed class StepProgress(Action<long> onStep) : IProgress<RunProgress>
    {
        public void Report(RunProgress value) => onStep(value.Step);
    }

    [Theory]
    [InlineData("trainer")]
    [InlineData("metrics")]
    public async Task An_actor_that_dies_restarts_the_pipeline_from_the_last_checkpoint_after_the_backoff_in_the_same_actor_system(string victim)
    {
        var runDir = Directory.CreateTempSubdirectory("mamo-restart-").FullName;
        try
        {
            var settings = MamoSettings.Load(null, [
                $"run-dir={runDir}", "batch-size=4", "max-steps=10", "eval.every-steps=0", "checkpoint.every-steps=4", "metrics.every-steps=1",
                "ledger=on", "supervision.min-backoff=3s", "source=\"dataset:emoji\""]);
            TrainingRun? run = null;
            var killed = 0;
            long killedAfter = -1;
            Akka.Actor.ActorSystem? system = null;
            var reports = new List<(long Step, TimeSpan At)>();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            run = new TrainingRun(settings, new StepProgress(step =>
            {
                lock (reports) reports.Add((step, clock.Elapsed));
                system ??= run!.System;
                // After step 6, once the checkpoint of step 4 is on disk (it is written beside the steps), the actor is
                // killed, as an exception in its handler would stop it.
                if (step >= 6 && Model.Checkpoint.Latest(runDir) is { } c && Model.Checkpoint.ReadState(c).Step == 4 && Interlocked.Exchange(ref killed, 1) == 0)
                {
                    killedAfter = step;
                    run!.System!.ActorSelection($"/user/{TrainingRun.SupervisorName}/{victim}").Tell(Akka.Actor.Kill.Instance);
                }
            }));
            Assert.Equal(10, await run.RunAsync(CancellationToken.None));

            var steps = File.ReadAllLines(Path.Combine(runDir, Metrics.LedgerFile))
                .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt64()).ToList();
            // 0..5 or more before the kill, then 4..9 again from the checkpoint at step 4.
            var restartAt = Enumerable.Range(1, steps.Count - 1).FirstOrDefault(i => steps[i] <= steps[i - 1]);
            Assert.True(restartAt > 0, $"no restart in the ledger: {string.Join(",", steps)}");
            Assert.Equal(4, steps[restartAt]);
            Assert.Equal(Enumerable.Range(4, 6).Select(i => (long)i), steps.Skip(restartAt));
            // The next report after the kill comes from the restarted pipeline, no sooner than the backoff.
            var kill = reports.FindIndex(r => r.Step == killedAfter);
            var firstAfter = reports.FindIndex(kill, r => r.Step == 5);
            Assert.True(firstAfter > kill, $"no report from the restarted pipeline: {string.Join(",", reports.Select(r => r.Step))}");
            Assert.True(reports[firstAfter].At - reports[kill].At >= settings.MinBackoff,
                $"restarted {reports[firstAfter].At - reports[kill].At} after the kill, before the {settings.MinBackoff} backoff");
            // One actor system for the run's whole life: the restart replaced the supervisor's children, not the system.
            Assert.Same(system, run.System);
            Assert.True(system!.WhenTerminated.IsCompleted);
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }
}
