namespace Mamo.Actors.Pipeline;

/// <summary>Dispatcher ids, defined in hocon/mamo.conf.</summary>
public static class Dispatchers
{
    /// <summary>A thread of its own per actor: TorchSharp dispose scopes belong to a thread, and model work must
    /// never block the shared dispatcher.</summary>
    public const string Model = "mamo.dispatchers.model";
    /// <summary>Blocking file writes (checkpoints, metrics).</summary>
    public const string Io = "mamo.dispatchers.io";
}
