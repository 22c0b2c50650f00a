using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;

namespace Mamo.Cli.Tests;

/// <summary>Runs the real `mamo` root command in-process and captures what it writes.</summary>
static class Cli
{
    public static (int ExitCode, string Stdout, string Stderr) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        var code = MamoRoot.Run(args, new InvocationConfiguration { Output = stdout, Error = stderr });
        return (code, stdout.ToString(), stderr.ToString());
    }
}

/// <summary>A fresh folder under the system temp directory, deleted with the test.</summary>
sealed class TempFolder : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("mamo-cli-test-").FullName;
    public string File(string relative) => System.IO.Path.Combine(Path, relative);
    public void Dispose() => Directory.Delete(Path, recursive: true);
}

/// <summary>`mamo` as a separate process, as a user runs it, and the ledger it writes.</summary>
static class MamoProcess
{
    /// <summary>One ledger line: the step, where the stream stood after it, its loss, the sample ids it trained on, and
    /// those of them the replay buffer gave.</summary>
    public sealed record LedgerEntry(long Step, IReadOnlyDictionary<string, long> Position, double Loss, string[] Ids, string[] Replayed)
    {
        public long Cursor => Position["cursor"];
    }

    public static List<LedgerEntry> Ledger(string runDir) => File.ReadAllLines(System.IO.Path.Combine(runDir, "ledger.jsonl"))
        .Where(l => l.EndsWith('}'))   // a line cut by SIGKILL is not a record
        .Select(l => JsonDocument.Parse(l).RootElement)
        .Select(e => new LedgerEntry(e.GetProperty("step").GetInt64(),
            e.GetProperty("position").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetInt64()),
            e.GetProperty("loss").GetDouble(), e.GetProperty("ids").EnumerateArray().Select(i => i.GetString()!).ToArray(),
            e.TryGetProperty("replayed", out var r) ? r.EnumerateArray().Select(i => i.GetString()!).ToArray() : []))
        .ToList();

    /// <summary>The step lines of a ledger file (a cluster replica's also has a line for each round's outcome), in order;
    /// a line cut by SIGKILL is not a record.</summary>
    public static List<JsonElement> Steps(string ledger) => File.ReadAllLines(ledger).Where(l => l.EndsWith('}'))
        .Select(l => JsonDocument.Parse(l).RootElement).Where(e => e.TryGetProperty("step", out _)).ToList();

    /// <summary>A cluster replica's round outcomes from its ledger: the attempts its coordinator applied, and the ones it did not.</summary>
    public static (HashSet<long> Applied, HashSet<long> NotApplied) Outcomes(string ledger)
    {
        var lines = File.ReadAllLines(ledger).Where(l => l.EndsWith('}')).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(e => e.TryGetProperty("applied", out _)).ToList();
        return (lines.Where(e => e.GetProperty("applied").GetBoolean()).Select(e => e.GetProperty("attempt").GetInt64()).ToHashSet(),
            lines.Where(e => !e.GetProperty("applied").GetBoolean()).Select(e => e.GetProperty("attempt").GetInt64()).ToHashSet());
    }

    /// <param name="interruptible">start it with SIGINT at its default action, as a terminal's process has it: a suite
    /// started in the background (`nohup bash .ci/run &`) runs with SIGINT ignored, a child inherits that, and the
    /// runtime then never hands SIGINT to the process's handlers</param>
    public static ProcessStartInfo StartInfo(IEnumerable<string> args, bool interruptible = false)
    {
        var info = new ProcessStartInfo(interruptible ? "env" : "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        if (interruptible) foreach (var a in (string[])["--default-signal=INT", "dotnet"]) info.ArgumentList.Add(a);
        info.ArgumentList.Add(System.IO.Path.Combine(AppContext.BaseDirectory, "mamo.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        return info;
    }

    public static (int Code, string Log) Run(IEnumerable<string> args)
    {
        using var p = Process.Start(StartInfo(args))!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(TimeSpan.FromMinutes(5))) { p.Kill(entireProcessTree: true); throw new TimeoutException("mamo did not finish"); }
        return (p.ExitCode, stdout + stderr.Result);
    }

    /// <summary>Starts mamo and SIGKILLs it once the ledger shows `stepsDone` steps and a checkpoint of at least step
    /// `checkpointAtLeast` is complete (a checkpoint is written beside training and may land a few steps late on a
    /// loaded machine).</summary>
    public static TimeSpan KillAfter(IEnumerable<string> args, string runDir, int stepsDone, long checkpointAtLeast = 0)
    {
        using var p = Process.Start(StartInfo(args))!;
        _ = p.StandardOutput.ReadToEndAsync();
        _ = p.StandardError.ReadToEndAsync();
        var clock = Stopwatch.StartNew();
        var ledger = System.IO.Path.Combine(runDir, "ledger.jsonl");
        while (clock.Elapsed < TimeSpan.FromMinutes(5))
        {
            if (p.HasExited) throw new InvalidOperationException($"mamo exited ({p.ExitCode}) before it could be killed");
            if (File.Exists(ledger) && File.ReadAllLines(ledger).Length >= stepsDone && (checkpointAtLeast == 0 || LastCheckpoint(runDir) >= checkpointAtLeast))
            {
                p.Kill();   // SIGKILL: no chance to checkpoint
                p.WaitForExit();
                return clock.Elapsed;
            }
            Thread.Sleep(20);
        }
        p.Kill();
        throw new TimeoutException("mamo did not reach the kill point");
    }

    /// <summary>The newest complete checkpoint's step in a run folder.</summary>
    public static long LastCheckpoint(string runDir) =>
        Directory.GetDirectories(System.IO.Path.Combine(runDir, "checkpoints"), "step-*").Where(d => !d.EndsWith(".tmp"))
            .Select(d => long.Parse(System.IO.Path.GetFileName(d)["step-".Length..])).Max();
}
