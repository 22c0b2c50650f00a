using System.Runtime.InteropServices;
using Mamo.Cli;

// The trainer and the pipelined teacher each run an OpenMP team at the same time; idle threads that spin then take
// the cores the other team needs (docs/PERFORMANCE.md: pipelined 85% of the bare loop spinning, 104-106% passive).
// Set before libtorch loads its libgomp, which reads the native environment once; a user's own setting wins.
if (Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") is null) Native.setenv("OMP_WAIT_POLICY", "PASSIVE", 0);

return MamoRoot.Run(args);

static class Native
{
    [DllImport("libc", SetLastError = true)]
    internal static extern int setenv([MarshalAs(UnmanagedType.LPUTF8Str)] string name, [MarshalAs(UnmanagedType.LPUTF8Str)] string value, int overwrite);
}
