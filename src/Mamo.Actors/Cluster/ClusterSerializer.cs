using System.Text;
using Akka.Actor;
using Akka.Serialization;
using SerializationException = System.Runtime.Serialization.SerializationException;

namespace Mamo.Actors.Cluster;

/// <summary>A message that crosses nodes; every such type has a manifest in ClusterSerializer.</summary>
public interface IClusterMessage;

/// <summary>The explicit wire format of every mamo message that crosses nodes: a string manifest per type and a binary
/// body written field by field. Nothing on the wire names a .NET type, so nothing the network sends can make this node
/// construct a type it did not expect; a malformed body is a SerializationException, never a partial object.</summary>
public sealed class ClusterSerializer(ExtendedActorSystem system) : SerializerWithStringManifest(system)
{
    const string OfferManifest = "transfer-offer", ChunkManifest = "transfer-chunk", AckManifest = "transfer-ack", AcceptManifest = "transfer-accept";
    const string RegisterManifest = "round-register", StartManifest = "round-start", DoneManifest = "round-done", FinishManifest = "round-finish";
    const string GetProgressManifest = "get-progress", ProgressManifest = "progress";
    const string CommitManifest = "round-commit";
    const string StepStartManifest = "step-start", StepDoneManifest = "step-done", StepAbortManifest = "step-abort", StepMadeManifest = "step-made";
    const string ReportStateManifest = "state-ask", StateReportManifest = "state-report";
    const string AwaitStepManifest = "follower-await", FollowedManifest = "follower-followed";
    /// <summary>Bounds a name and a dimension count: an offer is small, whatever the model.</summary>
    const int MaxName = 1024, MaxDims = 8, MaxTensors = 100_000;

    public override int Identifier => 7301;

    public override string Manifest(object o) => o switch
    {
        WeightTransfer.Offer => OfferManifest,
        WeightTransfer.Chunk => ChunkManifest,
        WeightTransfer.Ack => AckManifest,
        WeightTransfer.Accept => AcceptManifest,
        Coordination.Register => RegisterManifest,
        RoundCoordinator.RoundStart => StartManifest,
        RoundCoordinator.RoundDone => DoneManifest,
        Coordination.Finish => FinishManifest,
        Coordination.Commit => CommitManifest,
        Coordination.GetProgress => GetProgressManifest,
        Coordination.Progress => ProgressManifest,
        StepCoordinator.StepStart => StepStartManifest,
        StepCoordinator.StepDone => StepDoneManifest,
        StepCoordinator.Abort => StepAbortManifest,
        StepCoordinator.StepMade => StepMadeManifest,
        StepCoordinator.ReportState => ReportStateManifest,
        StepCoordinator.StateReport => StateReportManifest,
        CheckpointFollower.AwaitStep => AwaitStepManifest,
        CheckpointFollower.Followed => FollowedManifest,
        _ => throw new ArgumentException($"no wire format for {o.GetType()}"),
    };

    public override byte[] ToBinary(object obj)
    {
        using var buffer = new MemoryStream();
        using (var w = new BinaryWriter(buffer, Encoding.UTF8, leaveOpen: true))
        {
            switch (obj)
            {
                case WeightTransfer.Offer o:
                    w.Write(o.Id.ToByteArray());
                    w.Write((int)o.Tag.Kind);
                    w.Write(o.Tag.Attempt);
                    w.Write(o.Tag.Node);
                    w.Write(o.Tag.Part);
                    w.Write(o.DType);
                    w.Write(o.ChunkSize);
                    w.Write(o.Names.Count);
                    for (int i = 0; i < o.Names.Count; i++)
                    {
                        w.Write(o.Names[i]);
                        w.Write(o.Shapes[i].Length);
                        foreach (var d in o.Shapes[i]) w.Write(d);
                    }
                    break;
                case WeightTransfer.Chunk c:
                    w.Write(c.Id.ToByteArray());
                    w.Write(c.Index);
                    w.Write(c.Bytes.Length);
                    w.Write(c.Bytes);
                    break;
                case WeightTransfer.Ack a:
                    w.Write(a.Id.ToByteArray());
                    w.Write(a.Index);
                    break;
                case WeightTransfer.Accept a:
                    w.Write(a.Id.ToByteArray());
                    w.Write(a.Host);
                    w.Write(a.Port);
                    w.Write(a.Token.ToByteArray());
                    break;
                case Coordination.Register g:
                    w.Write(g.Node);
                    w.Write(Akka.Serialization.Serialization.SerializedActorPath(g.Receiver));
                    break;
                case RoundCoordinator.RoundStart s:
                    w.Write(s.Attempt);
                    w.Write(s.Round);
                    w.Write(s.FirstStep);
                    w.Write(s.Replicas);
                    w.Write(s.Schedule);
                    w.Write(s.Cursor);
                    w.Write(s.Records);
                    w.Write(s.Rewind);
                    WriteMap(w, s.State, w.Write);
                    w.Write(Akka.Serialization.Serialization.SerializedActorPath(s.DeltaReceiver));
                    break;
                case RoundCoordinator.RoundDone d:
                    w.Write(d.Attempt);
                    w.Write(d.Round);
                    w.Write(d.Node);
                    w.Write(d.Samples);
                    WriteMap(w, d.Positions, w.Write);
                    w.Write(d.Loss);
                    WriteMap(w, d.Terms, w.Write);
                    WriteMap(w, d.Observations, w.Write);
                    w.Write(d.Partial);
                    break;
                case Coordination.Commit c:
                    WriteMap(w, c.Positions, w.Write);
                    w.Write(c.Through);
                    w.Write(c.Applied.Count);
                    foreach (var a in c.Applied) w.Write(a);
                    break;
                case Coordination.Finish f:
                    w.Write(f.Round);
                    w.Write(f.Step);
                    break;
                case Coordination.GetProgress:
                    break;
                case Coordination.Progress p:
                    w.Write(p.Round);
                    w.Write(p.LastCheckpoint);
                    w.Write(p.Recent.Count);
                    foreach (var r in p.Recent)
                    {
                        w.Write(r.Number);
                        w.Write(r.Participants.Count);
                        foreach (var n in r.Participants) w.Write(n);
                        w.Write(r.Seconds);
                    }
                    w.Write(p.Recoveries.Count);
                    foreach (var r in p.Recoveries)
                    {
                        w.Write(r.Lost);
                        w.Write(r.Address);
                        w.Write(r.At.Ticks);
                        w.Write(r.Seconds ?? -1);
                    }
                    break;
                case StepCoordinator.StepStart s:
                    w.Write(s.Attempt);
                    w.Write(s.Step);
                    w.Write(s.Schedule);
                    w.Write(s.Cursor);
                    w.Write(s.BatchSize);
                    w.Write(s.Index);
                    w.Write(s.FirstRow);
                    w.Write(s.WithState);
                    WriteMap(w, s.State, w.Write);
                    w.Write(s.OptimizerStep);
                    w.Write(s.TeacherStep);
                    w.Write(s.Peers.Count);
                    foreach (var peer in s.Peers)
                    {
                        w.Write(peer.Node);
                        w.Write(Akka.Serialization.Serialization.SerializedActorPath(peer.Receiver));
                    }
                    w.Write(s.Reports);
                    w.Write(s.ReportsState);
                    w.Write(s.CheckHash);
                    w.Write(Akka.Serialization.Serialization.SerializedActorPath(s.Receiver));
                    break;
                case StepCoordinator.StepDone d:
                    w.Write(d.Attempt);
                    w.Write(d.Node);
                    w.Write(d.Samples);
                    w.Write(d.Loss);
                    WriteMap(w, d.Terms, w.Write);
                    WriteMap(w, d.Observations, w.Write);
                    w.Write(d.Hash);
                    break;
                case StepCoordinator.Abort a:
                    w.Write(a.Attempt);
                    break;
                case StepCoordinator.StepMade m:
                    w.Write(m.Attempt);
                    w.Write(m.GradNorm);
                    w.Write(m.Skipped);
                    w.Write(m.LearningRate);
                    break;
                case StepCoordinator.ReportState a:
                    w.Write(a.Request);
                    w.Write(Akka.Serialization.Serialization.SerializedActorPath(a.To));
                    break;
                case StepCoordinator.StateReport r:
                    w.Write(r.Request);
                    w.Write(r.Node);
                    w.Write(r.Step);
                    w.Write(r.OptimizerStep);
                    w.Write(r.TeacherStep);
                    WriteMap(w, r.State, w.Write);
                    break;
                case CheckpointFollower.AwaitStep a:
                    w.Write(a.Step);
                    break;
                case CheckpointFollower.Followed f:
                    w.Write(f.Step);
                    break;
                default:
                    throw new ArgumentException($"no wire format for {obj.GetType()}");
            }
        }
        return buffer.ToArray();
    }

    public override object FromBinary(byte[] bytes, string manifest)
    {
        try
        {
            using var r = new BinaryReader(new MemoryStream(bytes), Encoding.UTF8);
            object message = manifest switch
            {
                OfferManifest => ReadOffer(r),
                ChunkManifest => new WeightTransfer.Chunk(new Guid(r.ReadBytes(16)), r.ReadInt32(), ReadBytes(r)),
                AckManifest => new WeightTransfer.Ack(new Guid(r.ReadBytes(16)), r.ReadInt32()),
                AcceptManifest => new WeightTransfer.Accept(new Guid(r.ReadBytes(16)), r.ReadString(), r.ReadInt32(), new Guid(r.ReadBytes(16))),
                RegisterManifest => new Coordination.Register(r.ReadString(), ReadRef(r)),
                StartManifest => new RoundCoordinator.RoundStart(r.ReadInt64(), r.ReadInt64(), r.ReadInt64(), Replicas(r), r.ReadInt64(), r.ReadInt64(), r.ReadInt32(), r.ReadBoolean(),
                    ReadMap(r, r.ReadString, "state"), ReadRef(r)),
                DoneManifest => new RoundCoordinator.RoundDone(r.ReadInt64(), r.ReadInt64(), r.ReadString(), r.ReadInt64(), ReadMap(r, r.ReadInt64, "stream positions"),
                    r.ReadDouble(), ReadMap(r, r.ReadDouble, "loss terms"), ReadMap(r, r.ReadString, "observations"), r.ReadBoolean()),
                CommitManifest => new Coordination.Commit(ReadMap(r, r.ReadInt64, "stream positions"), r.ReadInt64(),
                    Enumerable.Range(0, Count(r, "attempts")).Select(_ => r.ReadInt64()).ToList()),
                FinishManifest => new Coordination.Finish(r.ReadInt64(), r.ReadInt64()),
                GetProgressManifest => new Coordination.GetProgress(),
                ProgressManifest => ReadProgress(r),
                StepStartManifest => new StepCoordinator.StepStart(r.ReadInt64(), r.ReadInt64(), r.ReadInt64(), r.ReadInt64(), r.ReadInt32(), r.ReadInt32(), r.ReadInt64(),
                    r.ReadBoolean(), ReadMap(r, r.ReadString, "state"), r.ReadInt64(), r.ReadInt64(), ReadPeers(r), r.ReadBoolean(), r.ReadBoolean(), r.ReadBoolean(), ReadRef(r)),
                StepDoneManifest => new StepCoordinator.StepDone(r.ReadInt64(), r.ReadString(), r.ReadInt64(), r.ReadDouble(), ReadMap(r, r.ReadDouble, "loss terms"),
                    ReadMap(r, r.ReadString, "observations"), Name(r)),
                StepAbortManifest => new StepCoordinator.Abort(r.ReadInt64()),
                StepMadeManifest => new StepCoordinator.StepMade(r.ReadInt64(), r.ReadDouble(), r.ReadBoolean(), r.ReadDouble()),
                ReportStateManifest => new StepCoordinator.ReportState(r.ReadInt64(), ReadRef(r)),
                StateReportManifest => new StepCoordinator.StateReport(r.ReadInt64(), Name(r), r.ReadInt64(), r.ReadInt64(), r.ReadInt64(), ReadMap(r, r.ReadString, "state")),
                AwaitStepManifest => new CheckpointFollower.AwaitStep(r.ReadInt64()),
                FollowedManifest => new CheckpointFollower.Followed(r.ReadInt64()),
                _ => throw new SerializationException($"unknown manifest '{manifest}'"),
            };
            if (r.BaseStream.Position != bytes.Length) throw new SerializationException($"{bytes.Length - r.BaseStream.Position} bytes left after a '{manifest}'");
            return message;
        }
        catch (Exception e) when (e is EndOfStreamException or ArgumentException or IOException or FormatException or OverflowException)
        {
            throw new SerializationException($"malformed '{manifest}' message: {e.Message}", e);
        }
    }

    /// <summary>A small map by name (stream positions, loss terms): a count, then name and value pairs.</summary>
    static void WriteMap<T>(BinaryWriter w, IReadOnlyDictionary<string, T> map, Action<T> write)
    {
        w.Write(map.Count);
        foreach (var (name, value) in map)
        {
            w.Write(name);
            write(value);
        }
    }

    /// <summary>Bounded as an offer's tensors are: at most MaxTensors entries, names of at most MaxName characters.</summary>
    static Dictionary<string, T> ReadMap<T>(BinaryReader r, Func<T> read, string what)
    {
        var count = Count(r, what);
        var map = new Dictionary<string, T>(count);
        for (int i = 0; i < count; i++)
        {
            var name = Name(r);
            map[name] = read();
        }
        return map;
    }

    /// <summary>Bounded as a map is: a history of at most MaxTensors entries, each of bounded names.</summary>
    static Coordination.Progress ReadProgress(BinaryReader r)
    {
        var (round, last) = (r.ReadInt64(), r.ReadString());
        var rounds = new List<RunHistory.Round>();
        for (int i = Count(r, "rounds"); i > 0; i--)
        {
            var number = r.ReadInt64();
            var names = new List<string>();
            for (int j = Count(r, "participants"); j > 0; j--) names.Add(Name(r));
            rounds.Add(new RunHistory.Round(number, names, r.ReadDouble()));
        }
        var recoveries = new List<RunHistory.Recovery>();
        for (int i = Count(r, "recoveries"); i > 0; i--)
        {
            var (lost, address, ticks, seconds) = (Name(r), Name(r), r.ReadInt64(), r.ReadDouble());
            recoveries.Add(new RunHistory.Recovery(lost, address, new DateTime(ticks, DateTimeKind.Utc), seconds < 0 ? null : seconds));
        }
        return new Coordination.Progress(round, last, rounds, recoveries);
    }

    static int Count(BinaryReader r, string what)
    {
        var count = r.ReadInt32();
        return count is < 0 or > MaxTensors ? throw new SerializationException($"{count} {what}") : count;
    }

    /// <summary>A step's number of replicas: its learning rate and teacher decay follow it, so it is at least 1.</summary>
    static int Replicas(BinaryReader r)
    {
        var replicas = r.ReadInt32();
        return replicas is < 1 or > MaxTensors ? throw new SerializationException($"{replicas} replicas") : replicas;
    }

    static string Name(BinaryReader r)
    {
        var name = r.ReadString();
        return name.Length > MaxName ? throw new SerializationException($"a name over {MaxName} characters") : name;
    }

    /// <summary>A step's replicas: at least one (its learning rate and teacher decay follow their number), each a node and its receiver.</summary>
    List<StepCoordinator.Peer> ReadPeers(BinaryReader r)
    {
        var count = Replicas(r);
        return Enumerable.Range(0, count).Select(_ => new StepCoordinator.Peer(Name(r), ReadRef(r))).ToList();
    }

    /// <summary>An actor reference as its path; resolving it creates nothing.</summary>
    IActorRef ReadRef(BinaryReader r) => system.Provider.ResolveActorRef(r.ReadString());

    static WeightTransfer.Offer ReadOffer(BinaryReader r)
    {
        var id = new Guid(r.ReadBytes(16));
        var kind = r.ReadInt32();
        if (!Enum.IsDefined((WeightTransfer.Kind)kind)) throw new SerializationException($"unknown transfer kind {kind}");
        var tag = new WeightTransfer.Tag((WeightTransfer.Kind)kind, r.ReadInt64(), Name(r), r.ReadInt32());
        var dtype = r.ReadString();
        var chunkSize = r.ReadInt32();
        var count = Count(r, "tensors in an offer");
        var names = new string[count];
        var shapes = new long[count][];
        for (int i = 0; i < count; i++)
        {
            names[i] = Name(r);
            var dims = r.ReadInt32();
            if (dims is < 0 or > MaxDims) throw new SerializationException($"a tensor of {dims} dimensions");
            shapes[i] = Enumerable.Range(0, dims).Select(_ => r.ReadInt64()).ToArray();
        }
        return new WeightTransfer.Offer(id, tag, names, shapes, dtype, chunkSize);
    }

    static byte[] ReadBytes(BinaryReader r)
    {
        var length = r.ReadInt32();
        if (length < 0 || length > r.BaseStream.Length - r.BaseStream.Position) throw new SerializationException($"a chunk of {length} bytes in a shorter message");
        return r.ReadBytes(length);
    }
}

/// <summary>Takes the place of Akka's default (JSON, type names on the wire) serializer: a message type with no
/// explicit wire format cannot leave this node, and a payload in that format is not read.</summary>
public sealed class RefusingSerializer : Serializer
{
    public RefusingSerializer(ExtendedActorSystem system) : base(system) { }
    /// <summary>Akka passes the settings it kept for the serializer this replaces (serialization-settings.json); none apply.</summary>
    public RefusingSerializer(ExtendedActorSystem system, Akka.Configuration.Config _) : base(system) { }

    public override int Identifier => 7300;
    public override bool IncludeManifest => false;

    public override byte[] ToBinary(object obj) =>
        throw new SerializationException($"{obj.GetType()} has no registered wire format (hocon/cluster.conf): it is not sent");

    public override object FromBinary(byte[] bytes, Type type) =>
        throw new SerializationException("a message in a format this node does not accept was refused");
}
