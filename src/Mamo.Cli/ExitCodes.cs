namespace Mamo.Cli;

/// <summary>What `mamo` exits with (README, "Exit codes"): the conventions of argparse and System.CommandLine, so that a
/// script or an orchestrator can tell a mistake in the command from a run that failed.</summary>
public static class ExitCodes
{
    public const int Success = 0;
    /// <summary>The work failed: a run that stopped on an error, an export or fetch that could not finish, a cluster that did not answer.</summary>
    public const int Failed = 1;
    /// <summary>The command cannot be run as given: an unknown option, a bad setting or file, a missing input, a busy explicit port.</summary>
    public const int Usage = 2;
    /// <summary>Stopped by Ctrl-C (SIGINT): after the final checkpoint on the first, at once on the second.</summary>
    public const int Interrupted = 130;
}
