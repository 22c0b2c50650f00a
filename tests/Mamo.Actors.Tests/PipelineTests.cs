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
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var reports = new List<(long Step, TimeSpan At)>();
            TrainingRun? run = null;
            Akka.Actor.ActorSelection Select(string name) => run!.System!.ActorSelection($"/user/{TrainingRun.SupervisorName}/{name}");
            var calls = -1;
            var killedAt = TimeSpan.Zero;
            Akka.Actor.IActorRef? firstCheckpointer = null;
            string? held = null;
            void BeforeLoss()
            {
                switch (Interlocked.Increment(ref calls))
                {
                    case 6:
                        // Step 6 of the first pipeline, once the checkpoint of step 4 is on disk (it is written beside the
                        // steps): the victim is killed, as an exception in its handler would stop it.
                        var deadline = clock.Elapsed + TimeSpan.FromMinutes(2);
                        while (Model.Checkpoint.Latest(runDir) is not { } c || Model.Checkpoint.ReadState(c).Step != 4)
                        {
                            if (clock.Elapsed > deadline) { held = "the checkpoint of step 4 was not written within 2 minutes"; break; }
                            Thread.Sleep(20);
                        }
                        firstCheckpointer = Select("checkpointer").ResolveOne(TimeSpan.FromSeconds(30)).Result;
                        killedAt = clock.Elapsed;
                        Select(victim).Tell(Akka.Actor.Kill.Instance);   // not resolved: a trainer held here cannot answer Identify
                        break;
                    case 7:
                        // Where the trainer lives on (the metrics actor died), it waits here until the first pipeline has
                        // stopped: it must not write the checkpoint of step 8 that the restart would then start from.
                        if (!Akka.Actor.WatchAsyncSupport.WatchAsync(firstCheckpointer!).Wait(TimeSpan.FromMinutes(2))) held = "the first pipeline did not stop within 2 minutes";
                        break;
                }
            }
            run = new TrainingRun(settings, new StepProgress(step => { lock (reports) reports.Add((step, clock.Elapsed)); }), objective: c => new HookedObjective(TrainingTask.Of(settings).Objective(c), BeforeLoss));
            var running = run.RunAsync(CancellationToken.None);
            var system = run.System;
            Assert.Equal(10, await running);
            Assert.Null(held);

            var steps = File.ReadAllLines(Path.Combine(runDir, Metrics.LedgerFile))
                .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("step").GetInt64()).ToList();
            // 0..6 before the kill (or less: a dead metrics actor writes no more), then 4..9 again from the checkpoint at step 4.
            var restartAt = Enumerable.Range(1, steps.Count - 1).FirstOrDefault(i => steps[i] <= steps[i - 1]);
            Assert.True(restartAt > 0, $"no restart in the ledger: {string.Join(",", steps)}");
            Assert.Equal(4, steps[restartAt]);
            Assert.Equal(Enumerable.Range(4, 6).Select(i => (long)i), steps.Skip(restartAt));
            // The first report of the restarted pipeline (after step 4 again) comes no sooner than the backoff after the kill.
            var firstAfter = Enumerable.Range(1, reports.Count - 1).FirstOrDefault(i => reports[i].Step <= reports[i - 1].Step);
            Assert.True(firstAfter > 0, $"no report from the restarted pipeline: {string.Join(",", reports.Select(r => r.Step))}");
            Assert.Equal(5, reports[firstAfter].Step);
            Assert.True(reports[firstAfter].At - killedAt >= settings.MinBackoff,
                $"restarted {reports[firstAfter].At - killedAt} after the kill, before the {settings.MinBackoff} backoff");
            // One actor system for the run's whole life: the restart replaced the supervisor's children, not the system.
            Assert.Same(system, run.System);
            Assert.True(system!.WhenTerminated.IsCompleted);
        }
        finally { Directory.Delete(runDir, recursive: true); }
    }
}
