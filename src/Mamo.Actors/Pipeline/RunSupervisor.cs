using Akka.Actor;
using Serilog;
using Mamo.Actors.Sources;

namespace Mamo.Actors.Pipeline;

/// <summary>The parent of a pipeline's actors, for the whole life of the process. It creates them as its children,
/// stops any child that throws (a restarted actor would carry stale state next to its peers), watches every one, and
/// reports the first that stops to whoever awaits the pipeline: the lifecycle then stops the rest and starts a new
/// set from the last checkpoint, in the same ActorSystem (a cluster node keeps its membership). It also answers
/// Flush: a final checkpoint, replied to once it is durable.</summary>
public sealed class RunSupervisor : ReceiveActor
{
    /// <summary>The actors the lifecycle and the stream graph talk to. Replica: a cluster replica's link to its
    /// coordinator (Cluster/Replica), which a stopping run lets hand in its last work.</summary>
    public sealed record Pipeline(IActorRef Trainer, IActorRef? Teacher, IActorRef Metrics, IActorRef? Evaluator, IActorRef? Publisher, IActorRef? Replica = null);

    /// <summary>Create the pipeline's actors (with Context.ActorOf) and reply with them; the previous set must be
    /// stopped. From: the durable checkpoint they start from.</summary>
    public sealed record Start(Func<IUntypedActorContext, Pipeline> Create, Checkpointer.CheckpointDurable From);
    /// <summary>Reply (once) when a child of the pipeline stops before StopPipeline: the pipeline has failed.</summary>
    public sealed record AwaitFailure;
    /// <summary>Reply to AwaitFailure; Cause: the exception that stopped it, when it threw. Requested: a child asked for
    /// the restart (RestartPipeline), which is no failure.</summary>
    public sealed record PipelineFailed(string Child, Exception? Cause, bool Requested = false);
    /// <summary>From a child: the pipeline must start again from durable state (a replica whose stream must be read again
    /// from the last cluster checkpoint).</summary>
    public sealed record RestartPipeline(string Why);
    /// <summary>Have the trainer checkpoint now; reply Flushed once that checkpoint is durable.</summary>
    public sealed record Flush;
    public sealed record Flushed(long Step, StreamPosition Position);
    /// <summary>Stop every child; reply Stopped once all have terminated, so their names are free again.</summary>
    public sealed record StopPipeline;
    public sealed record Stopped;

    sealed record FlushAt(long Step, IActorRef ReplyTo);

    readonly HashSet<IActorRef> children = [];
    Pipeline? pipeline;
    IActorRef? failureWaiter;
    PipelineFailed? failure;
    IActorRef? stopWaiter;
    Exception? lastCause;
    Checkpointer.CheckpointDurable? durable;
    (long Step, IActorRef ReplyTo)? flush;

    public RunSupervisor()
    {
        Receive<Start>(s =>
        {
            if (pipeline is not null || children.Count > 0)
            {
                Sender.Tell(new Status.Failure(new InvalidOperationException("a pipeline is already running")));
                return;
            }
            (failure, lastCause, durable, flush) = (null, null, s.From, null);
            try { pipeline = s.Create(Context); }
            catch (Exception e)
            {
                foreach (var child in Context.GetChildren()) Context.Stop(child);
                Sender.Tell(new Status.Failure(e));
                return;
            }
            foreach (var child in Context.GetChildren()) children.Add(Context.Watch(child));
            Sender.Tell(pipeline);
        });
        Receive<AwaitFailure>(_ =>
        {
            if (failure is not null) Sender.Tell(failure);
            else failureWaiter = Sender;
        });
        Receive<Terminated>(t =>
        {
            children.Remove(t.ActorRef);
            if (stopWaiter is not null)
            {
                if (children.Count == 0) StoppedAll();
                return;
            }
            if (pipeline is null || failure is not null) return;
            failure = new PipelineFailed(t.ActorRef.Path.Name, lastCause);
            Log.Error("actor {Child} of the pipeline stopped; the pipeline fails", t.ActorRef.Path.Name);
            failureWaiter?.Tell(failure);
            flush?.ReplyTo.Tell(new Status.Failure(new InvalidOperationException($"actor {t.ActorRef.Path.Name} of the pipeline stopped")));
            flush = null;
        });
        Receive<RestartPipeline>(r =>
        {
            if (pipeline is null || failure is not null) return;
            failure = new PipelineFailed(Sender.Path.Name, new InvalidOperationException(r.Why), Requested: true);
            Log.Information("actor {Child} restarts the pipeline: {Why}", Sender.Path.Name, r.Why);
            failureWaiter?.Tell(failure);
        });
        Receive<Flush>(_ =>
        {
            if (pipeline is null || failure is not null) { Sender.Tell(new Status.Failure(new InvalidOperationException("no pipeline runs"))); return; }
            var replyTo = Sender;
            pipeline.Trainer.Ask<Trainer.CheckpointComing>(new Trainer.CheckpointNow())
                .PipeTo(Self, success: c => new FlushAt(c.Step ?? -1, replyTo), failure: e => new Status.Failure(e));
        });
        Receive<FlushAt>(f =>
        {
            flush = (f.Step, f.ReplyTo);
            TryAnswerFlush();
        });
        Receive<Checkpointer.CheckpointDurable>(d =>
        {
            durable = d;
            TryAnswerFlush();
        });
        Receive<StopPipeline>(_ =>
        {
            stopWaiter = Sender;
            pipeline = null;
            failureWaiter = null;
            if (children.Count == 0) StoppedAll();
            else foreach (var child in children) Context.Stop(child);
        });
    }

    public static Props Props() => Akka.Actor.Props.Create(() => new RunSupervisor());

    /// <summary>A child that throws is stopped, and its exception kept for the failure report.</summary>
    protected override SupervisorStrategy SupervisorStrategy() => new OneForOneStrategy(e =>
    {
        lastCause ??= e;
        return Directive.Stop;
    });

    /// <summary>Flushed once the checkpoint of the flush's step is durable; at once where none was coming (step -1).</summary>
    void TryAnswerFlush()
    {
        if (flush is not { } f || durable is not { } d || d.Step < f.Step) return;
        f.ReplyTo.Tell(new Flushed(d.Step, d.Position));
        flush = null;
    }

    void StoppedAll()
    {
        stopWaiter!.Tell(new Stopped());
        stopWaiter = null;
    }
}
